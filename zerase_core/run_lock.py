"""One run at a time in a run's folder.

Two command-line runs into one ``--out`` (two terminals) both passed the folder's checks, which look at the files
there, until the first checkpoint was written (minutes on the real model): both then wrote the same files, and one run
was lost without a word. The folder is held by an operating-system lock for the whole run, which the system releases
when the process ends, however it ends: a killed run leaves nothing that blocks the next.
"""

from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ZEraseError
from .files import check_writable

log = logging.getLogger(__name__)

LOCK = ".zerase-run.lock"  # empty; kept in a folder that holds the run's files
NOT_A_FOLDER = "{} is a file; --out names a folder for the run's files."
_HELD = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)  # what a lock held by another process answers


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder`` (made if needed) for one run; another run holding it is refused at once, and touches nothing
    there. A folder made only for the lock is removed again if the run leaves nothing else in it (a run refused before
    its first file), and so are those made on the way when the lock file cannot be made (a full disk)."""
    folder = Path(folder)
    refuse_a_file(folder)
    check_writable(folder / LOCK)  # a name too long, a folder that cannot be written: told by name, nothing made
    made = [p for p in (folder, *folder.parents) if not os.path.exists(p)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_CREAT | os.O_RDWR, 0o666)
    except OSError as err:
        _remove_made(made)  # those made before the disk filled would stay behind, empty
        raise ZEraseError(f"Cannot make {folder / LOCK} ({err.strerror or err}); choose another --out.") from err
    try:
        _lock(fd, folder)
    except BaseException:
        os.close(fd)  # refused: the folder and its lock file are the other run's
        raise
    try:
        yield
    finally:
        if os.name == "nt":  # Windows removes no open file: release first; a run opening it meanwhile keeps it
            _unlock_windows(fd)
            os.close(fd)
            _remove_unused(folder, made)
        else:  # POSIX: remove while holding, so that no run locks a file already unlinked (see _lock)
            _remove_unused(folder, made)
            os.close(fd)  # releases the lock


def refuse_a_file(folder: Path) -> None:
    """A file where ``--out`` names the run's folder, refused by name (the lock and a run's checks share it)."""
    if os.path.isfile(folder):
        raise ZEraseError(NOT_A_FOLDER.format(folder))


def _lock(fd: int, folder: Path) -> None:
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in _HELD:  # a file system without locks (some network shares): the run goes on unguarded
            log.warning("Cannot lock %s (%s): nothing stops a second run into the same folder meanwhile.", folder,
                        err.strerror or err)
            return
        raise ZEraseError(_HELD_BY_ANOTHER.format(folder)) from err
    # The run that held it may have removed the file between our open and our lock: the lock is then on a file no
    # other run finds (POSIX), so it guards nothing.
    if os.name != "nt" and not _same_file(fd, folder / LOCK):
        raise ZEraseError(_HELD_BY_ANOTHER.format(folder))


_HELD_BY_ANOTHER = "Another run is writing into {} now; wait for it to end, or choose another --out."


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _unlock_windows(fd: int) -> None:
    """Release the byte locked, before closing: Windows releases a lock at close only when resources allow."""
    import msvcrt

    try:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:  # not locked (a file system without locks)
        pass


def _remove_unused(folder: Path, made: list[Path]) -> None:
    """The folders this run made, if nothing but the lock is in them (the user may have removed them meanwhile)."""
    if not made:
        return
    try:
        if os.listdir(folder) != [LOCK]:
            return
        os.remove(folder / LOCK)
    except OSError:  # gone already, or another run made something meanwhile: it keeps the folder
        return
    _remove_made(made)


def _remove_made(made: list[Path]) -> None:
    """The folders in ``made`` (deepest first) that are empty: rmdir removes no folder that holds anything, so one
    another writer filled meanwhile stays, with those above it."""
    for path in made:
        try:
            os.rmdir(path)
        except FileNotFoundError:  # never made (its mkdir failed), or removed meanwhile
            continue
        except OSError:
            return
