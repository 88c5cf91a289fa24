"""Save names users type (a node's ``save_name``): inside the output folder, never over another file, numbered
``name_001``, … when taken, and short enough for the file system."""

from __future__ import annotations

import glob
import itertools
import os
import re
from pathlib import Path
from typing import Iterator

from .errors import ZEraseError, shown
from .files import NAME_MAX, NAME_UNIT, check_portable, name_length, windows_device

# A save name's longest part, leaving room for a suffix (".safetensors"; ".zerase-ckpt" is as long) and a number.
_NAME_ROOM = NAME_MAX - len(".safetensors") - len("_001")
_NAME_CHARS = r"\w\-. "  # what a save name may hold
_SAFE_NAME = re.compile(rf"[{_NAME_CHARS}]+")  # fullmatch: "$" matches before a final newline ("sub\n")


def safe_output_path(folder: str | os.PathLike, name: str, suffix: str = ".safetensors") -> Path:
    """``folder/name`` for a user-typed name that must stay inside ``folder`` and not overwrite.

    An existing file gets a numbered sibling (name_001) instead of being replaced.
    """
    return next(p for p in numbered_paths(folder, name, suffix) if not _exists(p, name))


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
    while name_length(name) > _NAME_ROOM:  # a long concept still makes a name the file system takes
        name = name[:-1].rstrip(" .")
    if windows_device(name):  # the concept "nul" or "con.v2": a name Windows can save, "nul_", "con_.v2"
        head, dot, rest = name.partition(".")
        name = f"{head.rstrip()}_{dot}{rest}"
    return name if name.strip("_") else fallback


def stem(name: str, suffix: str = ".safetensors") -> str:
    """A typed save name as its files are named: around spaces and one trailing ``suffix`` off ("cat.safetensors ",
    "cat .safetensors" and "cat" name one run)."""
    return name.strip().removesuffix(suffix).strip()


def path_inside(folder: str | os.PathLike, name: str, suffix: str) -> Path:
    """Exactly ``folder/name + suffix`` for a user-typed name, refused if it would leave ``folder``.

    Subfolders are allowed ("nsfw/nudity"); "..", absolute paths and odd characters are not.
    """
    name = stem(name, suffix)
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or any(p in ("", ".", "..") or not _SAFE_NAME.fullmatch(p) for p in parts):
        raise ZEraseError(
            f"The save name '{shown(name)}' is not allowed: use letters (of any script), digits, spaces, '-', '_', '.' "
            "and optional subfolders, without '..' or an absolute path; files stay inside the output folder."
        )
    for part in parts[:-1]:
        check_portable(part)
    check_portable(parts[-1] + suffix)
    longest = max(parts, key=name_length)
    if name_length(longest) > _NAME_ROOM:  # before any lookup: Path.exists() raises on a name too long
        raise ZEraseError(f"The save name '{name}' is too long ('{longest[:40]}…' is {name_length(longest)} "
                          f"{NAME_UNIT}; at most {_NAME_ROOM}); choose a shorter save name.")
    root = Path(folder).resolve()
    path = root.joinpath(*parts[:-1], parts[-1] + suffix)
    if root not in path.resolve().parents:
        raise ZEraseError(f"The save name '{name}' would leave the folder {root}; choose a plain name.")
    _exists(path, name)  # a path too long as a whole is refused here, before any caller looks it up
    return path


def _exists(path: Path, name: str) -> bool:
    """Whether ``path`` exists; one the system cannot look up (too long as a whole, 25 subfolders of 200 characters,
    each part short enough) is refused by the save ``name`` it is made of: Path.exists() raises on it."""
    try:  # a link to nothing is taken too: the exclusive save refuses it, after the training
        return path.exists() or path.is_symlink()
    except OSError as err:
        raise ZEraseError(f"The save name '{shown(name, 60)}' makes a path too long for the system, or one it cannot "
                          f"look up ({err.strerror or err}); choose a shorter save name, or fewer subfolders.") from err
