"""The pack's one exception type for mistakes a user can make and fix."""


class ZEraseError(ValueError):
    """A problem the user can fix; the message says what to do.

    Subclassing ValueError keeps ComfyUI's error panel and plain Python callers
    treating it as bad input, not as an internal crash.
    """
