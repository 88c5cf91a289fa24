"""What the nodes share: the erasure-LoRA socket type, file lookup, progress, and save paths."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from comfy_api.latest import io

from zerase_core.errors import ZEraseError, shown
from zerase_core.lora_file import ErasureLoRA, load_lora

ErasureLoRAType = io.Custom("ZERASE_LORA")  # an in-memory zerase_core.lora_file.ErasureLoRA
NONE = "(none)"
SUBFOLDER = "zerase"


def lora_files() -> list[str]:
    import folder_paths

    return [NONE, *(portable(name) for name in folder_paths.get_filename_list("loras"))]


def portable(name: str, sep: str = os.sep) -> str:
    """'zerase\\cat.safetensors' on Windows -> 'zerase/cat.safetensors': the name a shared workflow stores must be the
    same on every system (ComfyUI lists subfolder files with the OS separator; get_full_path accepts '/' everywhere)."""
    return name.replace(sep, "/")


def checked_choice(node: str, name: str | None) -> bool | str:
    """``validate_inputs``' answer for a file choice: True, or why it cannot be read, told when a prompt is queued
    (before the loaders read the model, minutes on Z-Image). A linked name has no value then (None) and is checked
    when the node runs."""
    return name is None or _found(node, name)[1] or True


def node_id(node_class) -> str | None:
    """The id of the node a V3 node class runs as (its hidden ``unique_id``), where its texts are shown."""
    return getattr(node_class.hidden, "unique_id", None)


def read_lora_file(node: str, name: str) -> ErasureLoRA:
    path, problem = _found(node, name)
    if problem:
        raise ZEraseError(problem)
    with told_as(node):
        return load_lora(path)


def _found(node: str, name: str) -> tuple[str | None, str | None]:
    """(the chosen file's path, None), or (None, why it cannot be read): one lookup for both."""
    import folder_paths

    if not name:  # the file list was empty when the node was made
        return None, (f"{node}: there is no LoRA file to choose: train one with Z-Erase Train, or put a Z-Erase LoRA "
                      "into models/loras/ and refresh the page.")
    if name == NONE:
        return None, f"{node}: choose a LoRA file or connect an erasure LoRA."
    path = folder_paths.get_full_path("loras", name)
    return (path, None) if path is not None else (None, f"{node}: LoRA file '{shown(name)}' is not in any loras "
                                                        "folder.")


def listed(path: Path) -> str:
    """A saved file's name as Apply and Load list it ("zerase/…"), or its file name if it is not under the output
    folder as saved (a display string never fails a run). The folder is resolved as the saved path's root was (the
    loras folder or zerase/ may be a link); the file is not: a numbered version that links elsewhere is listed by its
    own name."""
    try:
        return f"{SUBFOLDER}/{Path(path).relative_to(output_folder().resolve()).as_posix()}"
    except ValueError:
        return Path(path).name


def show_text(shown_on: str | None, text: str) -> None:
    """``text`` on the node in the web UI (ComfyUI's progress text; v0.18.1's frontend 1.42.8 reads the message in
    another layout and shows nothing, later ones show it); nothing without a server (ComfyUI run as a library) or a
    node id. The server is looked up, not imported: ComfyUI's main imports it before any node runs, and
    importing it elsewhere starts its frontend management."""
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if server is not None and shown_on is not None:  # to the client that queued the prompt, as ComfyUI's progress
        server.send_progress_text(text, shown_on, getattr(server, "client_id", None))  # (names can be private)


@contextmanager
def told_as(node: str) -> Iterator[None]:
    """The engine's refusals under the node's name, as the node's own are: ComfyUI shows the message alone. (The
    ComfyUI backend is given the name too, for what its patches refuse later, inside a sampler's run; its messages
    already carry the prefix and pass unchanged.)"""
    try:
        yield
    except ZEraseError as err:
        if str(err).startswith(node):  # told by the node already, or by a backend under it ("… (model_b):")
            raise
        raise ZEraseError(f"{node}: {err}") from err


def parse_list(text: str, what: str, cast=str) -> list:
    """Comma-separated values of a text widget (';' too), each cast; empty items are skipped."""
    try:
        return [cast(t.strip()) for t in text.replace(";", ",").split(",") if t.strip()]
    except ValueError as err:
        raise ZEraseError(f"{what} must be comma-separated values, e.g. '0.5, 0.5' ({err}).") from err


def file_state(name: str):
    """What ComfyUI's cache keys a file choice on: its name, and its size and time when it exists. A resumed
    Train run rewrites the LoRA of its cancelled run under the same name; Apply and Load then read it again."""
    if name is None:  # linked: no value while ComfyUI keys the node, so keyed on every file it may name. A NaN
        # (≠ itself) re-ran the node, and every sampler after it, at every queue.
        return tuple(file_state(listed_name) for listed_name in lora_files()[1:])
    path, _ = _found("", name)
    if path is None:
        return name
    stat = os.stat(path)
    return name, stat.st_mtime_ns, stat.st_size


def output_folder() -> Path:
    """models/loras/zerase/ (the first configured loras folder)."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0]) / SUBFOLDER


def pick_lora(node: str, lora_name: str = NONE, erasure_lora: ErasureLoRA | None = None) -> ErasureLoRA:
    """The socket input wins over the file choice; one of them is needed."""
    return erasure_lora if erasure_lora is not None else read_lora_file(node, lora_name)


def check_vae(vae, channels: int) -> None:
    """A connected VAE that takes the model's latents, told before the node's work: another model's (SD's, 4
    channels) failed with torch's channel error only when it decoded, after Train had trained and the viewer had run
    its forwards."""
    found = getattr(vae, "latent_channels", None)  # ComfyUI's VAE says; anything else (or none) is left to its decode
    if found is not None and found != channels:
        raise ZEraseError(f"this VAE takes {found}-channel latents and Z-Image's have {channels}: connect "
                          "Z-Image's VAE (ae.safetensors), or leave vae unconnected for a cheap preview.")
