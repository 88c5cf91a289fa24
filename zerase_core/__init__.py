"""Z-Erase engine: text-token-gated LoRA concept erasure for single-stream DiTs (Z-Image).

Pure PyTorch; only backends/comfy_zimage imports ComfyUI, inside its functions. See README.md for the
map from the paper's equations to modules: gate.py (Eq. 4 S_T), lora.py (Eq. 4 ΔW), objectives.py
(Eq. 5-8; Eq. 6's attention mass is measured in attention_mass.py), lagrangian.py (Eq. 11, 12, 15),
trainer.py (Algorithm 1: ZEraseTrainer._step), merge.py (App. F).
"""

from .errors import ZEraseError

__version__ = "0.1.0"
__all__ = ["ZEraseError", "__version__"]
