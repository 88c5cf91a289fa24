"""scripts/gpu_bench.py as a module (scripts/ is not a package), for the tests that check it on the CPU."""

import importlib.util
from pathlib import Path


def load_gpu_bench():
    path = Path(__file__).parents[1] / "scripts" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
