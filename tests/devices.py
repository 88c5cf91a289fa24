"""Where a test that moves tensors between devices runs: always on the CPU (the test's own logic, with nothing to
move), and on a CUDA GPU where there is one (the move itself). The CPU-only CI skips the GPU case and says why."""

import pytest
import torch

ON_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the check is a move between two devices"))]
