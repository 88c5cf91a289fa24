"""The pack's one exception type for mistakes a user can make and fix, the command line's word for a stop, and text
read from a file as messages show it."""


class ZEraseError(ValueError):
    """A problem the user can fix; the message says what to do.

    Subclassing ValueError keeps ComfyUI's error panel and plain Python callers
    treating it as bad input, not as an internal crash.
    """


def shown(text: str, most: int = 200) -> str:
    """``text`` read from a file (a LoRA's concept, a tensor's name, an error quoting them) as a message shows it:
    cut after ``most`` characters, and every character that is not printable escaped (\\x1b, \\n). Files are
    shared: a concept's escape codes cleared the terminal the refusal was printed to, and its line breaks printed
    lines of their own ("Done: merged OK")."""
    cut = text[:most] + ("…" if len(text) > most else "")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut)


# What the command line says when Ctrl-C stops it outside a run's own handling (a run says what it kept).
STOPPED = "Stopped (Ctrl-C); every file written before is whole (each is written at once or not at all)."
