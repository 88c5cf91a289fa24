"""Z-Erase for ComfyUI: train, apply, merge and inspect text-token-gated erasure LoRAs on Z-Image.

ComfyUI loads this folder as a package and calls :func:`comfy_entrypoint` (the V3 API; this
pack defines no NODE_CLASS_MAPPINGS, which would make ComfyUI ignore the entrypoint).
The engine is imported by its own name, ``zerase_core``, as it is outside ComfyUI: :func:`_register_engine`.
"""

import importlib.util
import os
import sys

_ENGINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zerase_core")


def _register_engine() -> None:
    """Make this folder's ``zerase_core`` importable by that name, and nothing else of the folder: on sys.path the
    folder would also offer its ``tests``, ``tools`` and ``scripts`` to every other pack as top-level modules."""
    if "zerase_core" in sys.modules:  # the engine already imported (the tests put the checkout on sys.path)
        return
    spec = importlib.util.spec_from_file_location("zerase_core", os.path.join(_ENGINE, "__init__.py"),
                                                  submodule_search_locations=[_ENGINE])
    module = importlib.util.module_from_spec(spec)
    sys.modules["zerase_core"] = module  # before running it, as an import does: its submodules import it by name
    spec.loader.exec_module(module)


_register_engine()


async def comfy_entrypoint():
    from .nodes.extension import ZEraseExtension

    return ZEraseExtension()
