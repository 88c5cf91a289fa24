"""``python -m zerase_core``. A Ctrl-C while the commands' modules load (seconds of torch, before :func:`main` runs) is
told in one line, as one later is, not as a traceback."""

import sys

from .errors import STOPPED

try:
    from .cli import main
except KeyboardInterrupt:
    print(STOPPED, file=sys.stderr)
    sys.exit(130)  # the shell's code for SIGINT

sys.exit(main())
