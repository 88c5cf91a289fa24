"""The pack's one exception type for mistakes a user can make and fix, and the command line's word for a stop."""


class ZEraseError(ValueError):
    """A problem the user can fix; the message says what to do.

    Subclassing ValueError keeps ComfyUI's error panel and plain Python callers
    treating it as bad input, not as an internal crash.
    """


# What the command line says when Ctrl-C stops it outside a run's own handling (a run says what it kept).
STOPPED = "Stopped (Ctrl-C); every file written before is whole (each is written at once or not at all)."
