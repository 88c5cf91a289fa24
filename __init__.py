"""Z-Erase for ComfyUI: train, apply, merge and inspect text-token-gated erasure LoRAs on Z-Image.

ComfyUI loads this folder as a package and calls :func:`comfy_entrypoint` (the V3 API; this
pack defines no NODE_CLASS_MAPPINGS, which would make ComfyUI ignore the entrypoint).
The engine is imported by its own name, ``zerase_core``, as it is outside ComfyUI: :func:`_register_engine`.
"""

import importlib.util
import logging
import os
import sys

_ENGINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zerase_core")


def _register_engine() -> None:
    """Make this folder's ``zerase_core`` importable by that name, and nothing else of the folder: on sys.path the
    folder would also offer its ``tests``, ``tools`` and ``scripts`` to every other pack as top-level modules."""
    loaded = sys.modules.get("zerase_core")
    if loaded is not None:  # the engine already imported: the tests put the checkout on sys.path; or another copy
        where = os.path.dirname(os.path.realpath(getattr(loaded, "__file__", None) or "?"))
        if where != os.path.realpath(_ENGINE):
            logging.getLogger(__name__).warning(
                "Z-Erase: zerase_core was already imported from %s, not from this pack (%s), and the nodes run that "
                "copy. Remove the other one (a pip-installed zerase_core, or a second copy of this pack).", where,
                _ENGINE)
        return
    spec = importlib.util.spec_from_file_location("zerase_core", os.path.join(_ENGINE, "__init__.py"),
                                                  submodule_search_locations=[_ENGINE])
    module = importlib.util.module_from_spec(spec)
    sys.modules["zerase_core"] = module  # before running it, as an import does: its submodules import it by name
    try:
        spec.loader.exec_module(module)
    except BaseException:  # no half-made engine left for the next import to take
        del sys.modules["zerase_core"]
        raise


_register_engine()


async def comfy_entrypoint():
    from .nodes.extension import ZEraseExtension

    return ZEraseExtension()
