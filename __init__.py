"""Z-Erase for ComfyUI: train, apply, merge and inspect text-token-gated erasure LoRAs on Z-Image.

ComfyUI loads this folder as a package and calls :func:`comfy_entrypoint` (the V3 API; this
pack defines no NODE_CLASS_MAPPINGS, which would make ComfyUI ignore the entrypoint).
The engine, ``zerase_core``, is imported by its own name, so this folder goes on sys.path.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)


async def comfy_entrypoint():
    from .nodes.extension import ZEraseExtension

    return ZEraseExtension()
