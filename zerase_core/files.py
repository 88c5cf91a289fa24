"""Atomic writes, safetensors metadata and what the file system allows: one way to put a file on disk.

Ctrl-C held back while a run's files are written is in :mod:`.ctrl_c`.

Save names users type (a node's ``save_name``) are in :mod:`.save_names`.
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from .errors import ZEraseError, shown


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, Any],
                exclusive: bool = False) -> Path:
    """Write a safetensors file whole or not at all (see :func:`_atomic_write`); ``exclusive``: a new file only.

    Metadata values are stored as JSON, except strings that are not JSON themselves, which stay readable as they
    are (a concept "cat"); a string that would read back as JSON ("null", "3.5", a digest of digits) is quoted, so
    :func:`decode_metadata` returns every value as it was given.
    """
    meta = {k: v if isinstance(v, str) and _json(v) is _NOT_JSON else json.dumps(v) for k, v in metadata.items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # Serialised here, written by us: one write path whose failures are OSErrors (safetensors' own file writer
    # raises its SafetensorError for a full disk), and files with the user's umask (its writer makes them 0600).
    return _atomic_write(Path(path), save(tensors, metadata=meta), exclusive)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` whole or not at all (see :func:`_atomic_write`)."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` whole or not at all (see :func:`_atomic_write`)."""
    return _atomic_write(Path(path), data)


def _atomic_write(path: Path, data: bytes, exclusive: bool = False) -> Path:
    """``data`` into a temporary file beside ``path``, flushed to disk, then renamed over it: neither a crash nor a
    power loss leaves half a file, and a failed write (disk full, no permission) leaves the old one. ``exclusive``
    refuses to replace a file at ``path``, also one that appeared after the caller checked for it."""
    tmp = _temporary(path.parent)  # its name does not grow with the file's: any name that fits can be written
    try:
        with os.fdopen(_create(tmp), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the handle that wrote (Windows refuses fsync on a read-only one)
        if exclusive:
            _publish_new(tmp, path)
        else:
            os.replace(tmp, path)
    except FileExistsError as err:
        raise ZEraseError(f"{path} exists (it appeared while this was written); it was not replaced. Choose another "
                          "name.") from err
    except OSError as err:
        raise ZEraseError(f"Could not write {path}: {err.strerror or err}. Free disk space or choose a folder you "
                          "can write to; no earlier file was changed.") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _publish_new(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists, in one step where the system can (FileExistsError if so)."""
    if os.name == "nt":
        os.rename(tmp, path)  # Windows' rename refuses an existing target
        return
    try:
        os.link(tmp, path)  # refuses an existing target, where rename would replace it; tmp is removed after
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links (FAT, exFAT): check, then rename; a small window remains
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)


def check_writable(path: str | os.PathLike) -> None:
    """Refuse, before any work, a file that could not be written later (a name too long for the file system, a
    folder without write permission), instead of losing a training run at its first save.

    Nothing is left behind: the probe file goes into the deepest folder that exists, and folders still to be made
    are only checked (their names' lengths, no file in their place). The first real save makes them, so a run
    refused later (a resolution past the model's position tables) leaves no empty folder, and no other writer's new
    folder is taken away meanwhile.
    """
    path = Path(path)
    chain = (path.parent, *path.parent.parents)
    to_make = list(itertools.takewhile(lambda p: not os.path.isdir(p), chain))
    if len(to_make) == len(chain):
        raise ZEraseError(f"No folder on the way to {path} exists (a drive or share that is not there?); choose a "
                          "place that exists.")
    back_out = [p for p in to_make if p.name == ".."]
    if back_out:  # the system refuses "new/../x" while new does not exist; making new to step out of it left it empty
        raise ZEraseError(f"{path} steps back out of {back_out[-1].parent} with '..', and that folder does not exist; "
                          "write the path without that step.")
    for name in (path.name, *(p.name for p in to_make)):
        length = name_length(name)
        if length > NAME_MAX:
            raise ZEraseError(f"The name '{name}' is too long ({length} {NAME_UNIT}; file systems allow "
                              f"{NAME_MAX}); choose a shorter name.")
        if name != ".":  # "new/./x": a step of the path, not a name
            check_portable(name)
    blocked = [p for p in to_make if os.path.lexists(p)]
    if blocked:
        raise ZEraseError(f"{blocked[-1]} is a file, where a folder is needed for {path}; choose another place.")
    if os.path.isdir(path):  # the write would fail at the end, after the work (a resumed run's whole training)
        raise ZEraseError(f"{path} is a folder, where the file {path.name} is to be written; remove or rename that "
                          "folder, or choose another place.")
    existing = chain[len(to_make)]
    tmp = _temporary(existing)
    try:
        os.close(_create(tmp))
    except OSError as err:
        raise ZEraseError(f"Cannot create a file in {existing} ({err.strerror or err}). Choose a folder you can "
                          "write to.") from err
    os.unlink(tmp)


# Names Windows keeps for devices, up to Windows 10 with any extension too: there "nul.safetensors" is the null
# device, not a file. COM and LPT take the superscript digits ¹²³ as well (CPython's ntpath lists them too).
_WINDOWS_DEVICES = frozenset({"con", "prn", "aux", "nul", "conin$", "conout$",
                              *(f"{port}{n}" for port in ("com", "lpt") for n in "123456789¹²³")})


def windows_device(name: str) -> bool:
    """Whether Windows takes ``name`` for a device (its part before the first dot, case and trailing spaces aside)."""
    return name.split(".")[0].rstrip(" ").lower() in _WINDOWS_DEVICES


def check_portable(name: str) -> None:
    """Refuse a file or folder name Windows cannot hold as typed: a device name, or one ending in a dot or a space
    (which Windows drops, so "cat." and "cat" would be one file). Refused on every system, so that a save name in a
    shared workflow, or a command, works on all of them."""
    if windows_device(name):
        raise ZEraseError(f"The name '{name}' is a device name on Windows ({name.split('.')[0].strip().upper()}), "
                          "where nothing can be saved under it; choose another name.")
    if name.endswith((".", " ")):
        raise ZEraseError(f"The name '{name}' ends in {'a dot' if name.endswith('.') else 'a space'}, which Windows "
                          "drops from file names; choose a name without it.")
    if any(ord(ch) < 32 for ch in name):  # a line break pasted after a folder's name; DEL and C1 Windows takes
        raise ZEraseError(f"The name '{shown(name)}' holds a control character (a line break, a tab), which Windows "
                          "refuses in file names and a listing shows as a break; choose a name without it.")


NAME_MAX = 255  # one file name: bytes on ext4 and APFS, UTF-16 units on NTFS
NAME_UNIT = "UTF-16 units" if os.name == "nt" else "bytes"


def name_length(name: str) -> int:
    return len(name.encode("utf-16-le")) // 2 if os.name == "nt" else len(os.fsencode(name))


def _temporary(folder: Path) -> str:
    return str(folder / f".zerase-{uuid.uuid4().hex[:16]}.tmp")


def _create(tmp: str) -> int:
    """A new file ``tmp`` (its folder made if needed), open for binary writing, with the mode the user's umask
    gives any new file."""
    folder = Path(tmp).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:  # was told as the file to write having "appeared"
        blocked = next((p for p in (folder, *folder.parents) if os.path.lexists(p) and not os.path.isdir(p)), folder)
        raise ZEraseError(f"{blocked} is a file, where a folder is needed; choose another place.") from err
    return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)


_NOT_JSON = object()


def _json(text: str) -> Any:
    """``text`` parsed as JSON, or ``_NOT_JSON``: also text past the parser's limits (nested deeper than Python's
    recursion limit, an integer of more than 4300 digits), which :func:`atomic_save` then stores as it is and
    :func:`decode_metadata` reads back as text; a file's damaged value is refused by what expects a number or a
    dict there, not by a traceback."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError, as int()'s digit limit is
        return _NOT_JSON


def decode_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """Inverse of :func:`atomic_save`'s encoding: JSON where it parses, plain strings otherwise."""
    return {key: value if (parsed := _json(value)) is _NOT_JSON else parsed for key, value in meta.items()}


def as_json(value: Any) -> Any:
    """``value`` as its JSON metadata round trip holds it (tuples become lists): what a file compares equal to."""
    return json.loads(json.dumps(value))
