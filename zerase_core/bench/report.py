"""How every benchmark hands back its result: JSON on stdout, the same in ``--out``, with the command that made it."""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

from ..cli import print_result
from ..errors import ZEraseError
from ..files import atomic_write_text, check_writable


def command_line(argv: list[str]) -> str:
    """The command as it was run, with the thread count it ran under (timings depend on it)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    return " ".join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), "python -m zerase_core", shlex.join(argv)])


def write_json(result: dict, out: Path | None) -> str:
    """``result`` as indented JSON, also written to ``out`` when given: whole or not at all, so a run cut off while
    writing leaves the last result readable. Returns the text."""
    text = json.dumps(result, indent=2, default=str)
    if out:
        atomic_write_text(out, text + "\n")
    return text


def check_out(out: Path | None) -> None:
    """Refuse, before a benchmark measures anything, an ``--out`` it could not write its result to at the end."""
    if out is None:
        return
    if os.path.isdir(out):
        raise ZEraseError(f"{out} is a folder; --out names the JSON file to write.")
    check_writable(out)
    if out.suffix.lower() != ".json":  # a LoRA or a checkpoint given by mistake would be replaced by the table
        raise ZEraseError(f"--out names the JSON file to write, ending in .json; got {out}.")
    if os.path.isfile(out) and not _json_file(out):
        raise ZEraseError(f"{out} exists and is not JSON, so not an earlier result of a benchmark, which is all --out "
                          "replaces; choose another --out.")


def _json_file(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def emit(result: dict, args: argparse.Namespace) -> None:
    """Add ``command`` to ``result``, print it (stdout stays valid JSON) and write it to ``args.out`` when given:
    each though the other fails, so that a failed write or a closed pipe loses nothing measured."""
    result["command"] = command_line(args.argv)
    text = write_json(result, None)
    try:
        print_result(text)
    finally:
        if args.out:
            atomic_write_text(args.out, text + "\n")
