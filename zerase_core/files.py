"""Atomic safetensors writes and safe output names: one way to put a file on disk."""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save

from .errors import ZEraseError


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
    return _atomic_write(Path(path), text.encode())


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
    folder without write permission), instead of losing a training run at its first save."""
    path = Path(path)
    length = _name_length(path.name)
    if length > NAME_MAX:
        raise ZEraseError(f"The file name '{path.name}' is too long ({length} {_NAME_UNIT}; file systems allow "
                          f"{NAME_MAX}); choose a shorter name.")
    tmp = _temporary(path.parent)
    try:
        os.close(_create(tmp))
    except OSError as err:
        raise ZEraseError(f"Cannot write into {path.parent}: {err.strerror or err}. Choose a folder you can write "
                          "to.") from err
    os.unlink(tmp)


NAME_MAX = 255  # one file name: bytes on ext4 and APFS, UTF-16 units on NTFS
_NAME_UNIT = "UTF-16 units" if os.name == "nt" else "bytes"
# A save name's longest part, leaving room for a suffix (".safetensors", ".zerase-ckpt") and a number ("_001").
_NAME_ROOM = NAME_MAX - 32


def _name_length(name: str) -> int:
    return len(name.encode("utf-16-le")) // 2 if os.name == "nt" else len(os.fsencode(name))


def _temporary(folder: Path) -> str:
    return str(folder / f".zerase-{uuid.uuid4().hex[:16]}.tmp")


def _create(tmp: str) -> int:
    """A new file ``tmp`` (its folder made if needed), open for binary writing, with the mode the user's umask
    gives any new file."""
    Path(tmp).parent.mkdir(parents=True, exist_ok=True)
    return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)


_NOT_JSON = object()


def _json(text: str) -> Any:
    """``text`` parsed as JSON, or ``_NOT_JSON``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _NOT_JSON


def decode_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """Inverse of :func:`atomic_save`'s encoding: JSON where it parses, plain strings otherwise."""
    return {key: value if (parsed := _json(value)) is _NOT_JSON else parsed for key, value in meta.items()}


_NAME_CHARS = r"\w\-. "  # what a save name may hold
_SAFE_NAME = re.compile(rf"^[{_NAME_CHARS}]+$")


def safe_output_path(folder: str | os.PathLike, name: str, suffix: str = ".safetensors") -> Path:
    """``folder/name`` for a user-typed name that must stay inside ``folder`` and not overwrite.

    An existing file gets a numbered sibling (name_001) instead of being replaced.
    """
    return next(p for p in numbered_paths(folder, name, suffix) if not p.exists())


def numbered_paths(folder: str | os.PathLike, name: str, suffix: str = ".safetensors") -> Iterator[Path]:
    """``folder/name``, then ``name_001``, ``name_002`` …: the names :func:`safe_output_path` picks from, in order."""
    path = path_inside(folder, name, suffix)
    yield path
    for n in itertools.count(1):
        yield _numbered(path, n, suffix)


def _numbered(first: Path, n: int, suffix: str) -> Path:
    """The ``n``-th taken-name alternative of ``first``: ``name_001``, … (the one place the format is written)."""
    return first.with_name(f"{first.stem}_{n:03d}{suffix}")


def saved_versions(folder: str | os.PathLike, name: str, suffix: str = ".safetensors") -> list[Path]:
    """The files :func:`safe_output_path` wrote for ``name`` that exist now, in number order; gaps (a deleted
    ``name_001``) do not hide later ones."""
    first = path_inside(folder, name, suffix)
    number = re.compile(rf"^{re.escape(first.stem)}_(\d+){re.escape(suffix)}$")
    found = sorted((int(m[1]), p) for p in first.parent.glob(f"{glob.escape(first.stem)}_*{suffix}")
                   if (m := number.match(p.name)) and p == _numbered(first, int(m[1]), suffix))
    return ([first] if first.exists() else []) + [p for _, p in found]


def name_from(text: str, fallback: str = "zerase") -> str:
    """A save name made from free text (a concept such as "Mickey Mouse (Disney)" or "AC/DC"): every character a
    save name may not hold, the folder separator included, becomes '_'."""
    name = re.sub(rf"[^{_NAME_CHARS}]", "_", text).strip(" .")
    while _name_length(name) > _NAME_ROOM:  # a long concept still makes a name the file system takes
        name = name[:-1].rstrip(" .")
    return name if name.strip("_") else fallback


def path_inside(folder: str | os.PathLike, name: str, suffix: str) -> Path:
    """Exactly ``folder/name + suffix`` for a user-typed name, refused if it would leave ``folder``.

    Subfolders are allowed ("nsfw/nudity"); "..", absolute paths and odd characters are not.
    """
    name = name.strip()
    if name.endswith(suffix):
        name = name[: -len(suffix)]
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or any(p in ("", ".", "..") or not _SAFE_NAME.match(p) for p in parts):
        raise ZEraseError(
            f"The save name '{name}' is not allowed: use letters, digits, '-', '_', '.' and optional "
            "subfolders, without '..' or an absolute path; files stay inside the output folder."
        )
    longest = max(parts, key=_name_length)
    if _name_length(longest) > _NAME_ROOM:  # before any lookup: Path.exists() raises on a name too long
        raise ZEraseError(f"The save name '{name}' is too long ('{longest[:40]}…' is {_name_length(longest)} "
                          f"{_NAME_UNIT}; at most {_NAME_ROOM}); choose a shorter save name.")
    root = Path(folder).resolve()
    path = root.joinpath(*parts[:-1], parts[-1] + suffix)
    if root not in path.resolve().parents:
        raise ZEraseError(f"The save name '{name}' would leave the folder {root}; choose a plain name.")
    return path
