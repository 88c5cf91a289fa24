"""scripts/gpu_bench.py as a module (scripts/ is not a package), for the tests that check it on the CPU."""

import importlib.util
import sys
from pathlib import Path


def load_gpu_bench():
    """The script's module; the repository root it puts first on sys.path for itself is taken off again, or a later
    ``import nodes`` in this process would find the pack's nodes/ instead of ComfyUI's nodes.py."""
    path = Path(__file__).parents[1] / "scripts" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: its dataclass looks its module up there
    saved = sys.path[:]
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module
