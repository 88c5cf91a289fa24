"""ComfyUI nodes of the Z-Erase pack: one module per node; the nodes hold no math."""
