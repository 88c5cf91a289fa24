"""Z-Erase cost on a randomly initialised full-size Z-Image (no weights needed), on one GPU.

    python scripts/gpu_bench.py --out docs/bench/gpu.json          # one GPU with >= 40 GB (about 6 min on an H200)
    COMFYUI_PATH=~/ComfyUI python scripts/gpu_bench.py --host comfy --weights bf16 fp8 --resolutions 512 \
        --no-ckpt-resolutions --out docs/bench/gpu_comfy.json      # the nodes' backend on ComfyUI's class
    python scripts/gpu_bench.py --resolutions --partial-resolutions 512   # only what "auto" chooses between (~1 min)
    python scripts/gpu_bench.py --tiny [--host comfy]              # CPU, seconds: checks the script

``--host diffusers`` (the default) measures the CLI's backend on diffusers' class; ``--host comfy``
the nodes' backend on ComfyUI's own ``model_base.Lumina2`` in a ModelPatcher, inside the training
session the node uses, with bf16 weights or fp8 ones (ComfyUI's weight_dtype fp8_e4m3fn).

Measures, side by side on the same model and batch (rank-16 gated LoRA on the
main layers' q/k/v, 64 caption tokens), at 512² and 1024² with gradient checkpointing and at
512² also without (``--no-ckpt-resolutions``; an 80 GB card has room): for both x_t sources
(fresh ESD sampling, and the pool, the default) seconds per step of ours at λ > 0 and λ = 0
and of plain gated ESD with the same source, of the official-style reference, the per-part
split (x_t, teacher, student forward/backward, attention mass, AdamW), each variant's
peak GPU memory above the resident weights (torch.cuda.max_memory_allocated), and minutes
per 1000 steps — pool build or per-step sampling included, and weighed by how often the
paper's λ rule leaves λ > 0 on the toy (``paper_lambda_weighted``). At 512² (``--partial-resolutions``) also a
λ > 0 step with none, a third, two thirds, all but one and all of the main layers checkpointed, and each one's peak
memory: what gradient checkpointing ``auto`` chooses between (``checkpointing`` in the JSON). Prints JSON.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import importlib
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zerase_core.backends.base import Backend  # noqa: E402
from zerase_core.backends.diffusers_zimage import DiffusersZImageBackend, LatentSpec  # noqa: E402
from zerase_core.bench.checkpointing import measure  # noqa: E402
from zerase_core.bench.cost import SpeedCase, base_config, time_case  # noqa: E402
from zerase_core.bench.timing import check_timing, device_sync  # noqa: E402
from zerase_core.bench.estimate import REAL, FixedLengthEncoder, scaled_zimage  # noqa: E402
from zerase_core.bench.report import check_out, write_json  # noqa: E402
from zerase_core.errors import ZEraseError  # noqa: E402
from zerase_core.config import TrainConfig  # noqa: E402
from zerase_core.lora import LoRAConfig  # noqa: E402

log = logging.getLogger("gpu_bench")
CAPTION_TOKENS = REAL["caption_tokens"]  # the H100 figures were taken with 64


# The sizes ComfyUI's model_detection reads off Z-Image's weights, under the names both classes use (axes_lens is
# not among them: ComfyUI's detection sets 1536 for the first axis where diffusers' class defaults to 1024).
SIZES = ("dim", "cap_feat_dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads", "in_channels", "axes_dims",
         "rope_theta")


@dataclass
class Built:
    """One model to measure, with what its host wants around the measurement."""

    backend: Backend
    dit: torch.nn.Module
    session: Callable[[], ContextManager] = contextlib.nullcontext  # the node trains inside ComfyUI's session
    release: Callable[[], None] = lambda: None


def _build(host: str, weights: str, device: str, tiny: bool) -> Built:
    """One model and its backend: diffusers' class with the CLI's backend, or ComfyUI's with the nodes' backend;
    64-token random captions either way (the DiT does not care what they mean; no text encoder is loaded)."""
    if host == "diffusers":
        model = scaled_zimage(256, 2, torch.float32) if tiny else full_size_zimage(device)
        captions = FixedLengthEncoder(model.config.cap_feat_dim, CAPTION_TOKENS)
        backend = DiffusersZImageBackend(model.to(device), captions, LatentSpec(channels=model.config.in_channels))
        return Built(backend, model)
    comfy = _import_comfy(device)
    fp8 = torch.float8_e4m3fn if weights == "fp8" else None
    if tiny:  # the integration tests' tiny model: fp32, or fp8 stored and computed in fp32
        patcher = _comfy_support().tiny_zimage(comfy, weight_dtype=fp8)
    else:
        patcher = full_size_comfy_zimage(comfy, device, fp8 or torch.bfloat16)
    from zerase_core.backends.comfy_zimage import ComfyZImageBackend, training_session

    class FixedCaptions(ComfyZImageBackend):
        def encode(self, prompts):
            return FixedLengthEncoder(self.cap_feat_dim, CAPTION_TOKENS).encode(prompts)

    backend = FixedCaptions(patcher)
    # ComfyUI keeps loaded models in its list: unloaded, the model's memory goes with the backend.
    return Built(backend, backend.dit, lambda: training_session(backend), comfy.mm.unload_all_models)


def _comfy_support():
    """tests/comfy_support.py: finds a ComfyUI checkout (COMFYUI_PATH) and imports it in process, as the tests do."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module("comfy_support")


def _import_comfy(device: str):
    """ComfyUI, imported on ``device`` (comfy_support keeps it on the CPU unless told otherwise)."""
    if device == "cuda":
        os.environ["ZERASE_TEST_DEVICE"] = "gpu"
    path, how = _comfy_support().find_comfyui()
    if path is None:
        raise SystemExit(f"--host comfy: {how}")
    return _comfy_support().import_comfy(path)


@torch.no_grad()
def full_size_comfy_zimage(comfy, device: str, weight_dtype: torch.dtype):
    """ComfyUI's Z-Image (``model_base.Lumina2``) at its real size in a ModelPatcher, random weights, built on the
    device; fp8 weights are cast to bf16 layer by layer as they run (ComfyUI's manual-cast ops, as its loader
    makes them for weight_dtype fp8_e4m3fn)."""
    released = _released_zimage().config  # diffusers' class defaults: the released model's sizes
    sizes = {k: released[k] for k in SIZES} | {"patch_size": released["all_patch_size"][0]}
    config = comfy.supported_models.ZImage({**_comfy_support().TINY_DIT, **sizes})
    config.set_inference_dtype(weight_dtype, None if weight_dtype == torch.bfloat16 else torch.bfloat16)
    model = config.get_model({}, "", device=torch.device(device))
    _randomise(model.diffusion_model, device)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                            offload_device=comfy.mm.unet_offload_device())


@torch.no_grad()
def full_size_zimage(device: str) -> torch.nn.Module:
    """diffusers' Z-Image at its real size, random weights, bf16, built directly on the device."""
    # bf16 while still on meta: to_empty in fp32 would first take 24.6 GB of the card
    model = _released_zimage().to(torch.bfloat16).to_empty(device=device)
    _randomise(model, device)
    return model.eval()


def _released_zimage() -> torch.nn.Module:
    """diffusers' Z-Image on the meta device: its class defaults are the released model's sizes."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        return ZImageTransformer2DModel()


@torch.no_grad()
def _randomise(model: torch.nn.Module, device: str) -> None:
    """N(0, 0.02) weights, drawn in bf16 (fp8 ones rounded from it); RMSNorm weights 1, as trained models start."""
    norms = {f"{n}.weight" for n, m in model.named_modules() if "RMSNorm" in type(m).__name__}
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if name in norms:
            p.fill_(1.0)
        else:
            p.copy_(torch.empty(p.shape, device=device, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g))


def _stored_as(module: torch.nn.Module) -> str:
    """The dtype most of the weights are stored in (by count: a model may keep some parameters wider)."""
    counts = collections.Counter()
    for p in module.parameters():
        counts[p.dtype] += p.numel()
    return str(counts.most_common(1)[0][0]).removeprefix("torch.")


def _weights_gib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="a scaled-down model on the CPU at 64², with and without checkpointing: checks the script")
    parser.add_argument("--host", choices=["diffusers", "comfy"], default="diffusers",
                        help="whose Z-Image class and backend: diffusers' (the CLI's) or ComfyUI's (the nodes'; "
                             "finds ComfyUI through COMFYUI_PATH)")
    parser.add_argument("--weights", choices=["bf16", "fp8"], nargs="+", default=["bf16"],
                        help="base weights, one model after the other; fp8 is ComfyUI's weight_dtype fp8_e4m3fn "
                             "(stored in fp8, each layer cast to bf16 as it runs), so it needs --host comfy")
    parser.add_argument("--resolutions", type=int, nargs="*", default=[512, 1024],
                        help="the full rows (with checkpointing, and without for those also in --no-ckpt-resolutions); "
                             "none (--resolutions alone) measures only the --partial-resolutions rows")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant after one warm-up")
    parser.add_argument("--pool", type=int, default=TrainConfig.xt_pool, help="trajectories in the x_t pool "
                        "(TrainConfig's default)")
    parser.add_argument("--no-ckpt-resolutions", type=int, nargs="*", default=[512],
                        help="also measure these resolutions without gradient checkpointing")
    parser.add_argument("--partial-resolutions", type=int, nargs="*", default=[512],
                        help="also time a step with none, 1/3, 2/3, all but one and all of the main layers "
                             "checkpointed (what 'auto' chooses between), with each one's peak memory "
                             "(bench-checkpointing)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if "fp8" in args.weights and args.host != "comfy":
        parser.error("fp8 base weights are ComfyUI's weight_dtype fp8_e4m3fn: add --host comfy")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no GPU: run with --tiny to check the script on a CPU")
    try:  # before a model is built: what would fail after the first row's minutes
        check_timing(args.steps)
        check_out(args.out)
        for px in {*args.resolutions, *args.no_ckpt_resolutions, *args.partial_resolutions}:  # --pool 0, 0 px
            base_config(height=px, width=px, xt_pool=args.pool)
    except ZEraseError as err:
        parser.error(str(err))

    device = "cpu" if args.tiny else "cuda"
    res = ([64] if args.resolutions else []) if args.tiny else args.resolutions  # none: the partial rows alone
    no_ckpt = res if args.tiny else args.no_ckpt_resolutions  # the check runs both kinds of row
    # Cheapest first, so a run cut off by the device's time limit has the 512² rows (the 10-minute question).
    runs = sorted([(px, True) for px in res] + [(px, False) for px in res if px in no_ckpt],
                  key=lambda run: (run[0], run[1]))
    rank = 4 if args.tiny else 16
    command = shlex.join(["python", "scripts/gpu_bench.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__,
              "diffusers": diffusers.__version__, "host": args.host, "caption_tokens": CAPTION_TOKENS, "rank": rank,
              "rows": []}
    if args.host == "comfy":
        _import_comfy(device)
        result["comfyui"] = importlib.import_module("comfyui_version").__version__  # beside ComfyUI's main.py
    for weights in args.weights:  # one model at a time: two full-size ones would not fit a 24 GB card
        _measure_model(args, weights, device, runs, result)
        gc.collect()  # the model's last references went with _measure_model's frame
        if device == "cuda":
            torch.cuda.empty_cache()
    print(write_json(result, None))
    return 0


def _measure_model(args, weights: str, device: str, runs: list[tuple[int, bool]], result: dict) -> None:
    """Build one model, append its rows to ``result`` (written after each), and free it."""
    built = _build(args.host, weights, device, args.tiny)
    result.setdefault("models", []).append({
        "weights": weights, "stored_as": _stored_as(built.dit), "weights_gib": _weights_gib(built.dit),
        "resident_gib": torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0})
    _warm_up(built.backend)  # the device's one-off start (kernels, library handles) out of the first row's pool build
    name = f"z-image-{'tiny' if args.tiny else 'random'}-{args.host}-{weights}"
    for px, ckpt in runs:
        config = base_config(height=px, width=px, xt_pool=args.pool, gradient_checkpointing="on" if ckpt else "off",
                              lora=LoRAConfig(rank=result["rank"]), shuffle_pool=2)
        with built.session():
            result["rows"].append(_row(SpeedCase(name, built.backend, config), args.steps) | {"weights": weights})
        _save(result, args.out)
    for px in [64] if args.tiny else args.partial_resolutions:
        result.setdefault("checkpointing", []).append(_partial_row(built, px, result["rank"]) | {"weights": weights})
        _save(result, args.out)
    built.release()


def _save(result: dict, out: Path | None) -> None:
    """After every row: a run cut off by a time limit keeps what it measured."""
    try:
        write_json(result, out)
    except ZEraseError as err:  # a full disk: the rows are printed at the end all the same
        log.error("%s", err)


def _partial_row(built: Built, px: int, rank: int) -> dict:
    """A step with k of the main layers checkpointed, k from none to all (zerase_core/bench/checkpointing.py)."""
    n = built.backend.n_layers
    counts = sorted({0, n // 3, 2 * n // 3, n - 1, n})  # n − 1: the peak model says the last layer saves little
    config = base_config(height=px, width=px, xt_pool=1, lora=LoRAConfig(rank=rank), shuffle_pool=2)
    try:
        with built.session():
            row = measure(built.backend, config, counts, steps=2, repeats=3)
    except Exception as err:  # noqa: BLE001 — as _row: recorded, and the run goes on
        log.exception("%d² partial checkpointing failed", px)
        row = {"resolution": [px, px], "error": repr(err)}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _row(case: SpeedCase, steps: int) -> dict:
    """One resolution's measurements; a row that fails is recorded with its error and the run goes on to the next
    (there may be one device slot for the whole script)."""
    px, ckpt = case.config.height, case.config.gradient_checkpointing == "on"
    try:
        row = time_case(case, steps) | {"gradient_checkpointing": ckpt}
    except Exception as err:  # noqa: BLE001 — anything: NaN, out of memory, a kernel error
        log.exception("%d² ckpt=%s failed", px, ckpt)
        row = {"resolution": [px, px], "gradient_checkpointing": ckpt, "error": repr(err)}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # here, not in the except: its traceback held the failed row's tensors
        # (after a device-side error the context is broken and this raises: the run ends, earlier rows written)
    if "error" not in row:
        log.info("%d² ckpt=%s: %s", px, ckpt, json.dumps(row["seconds_per_step"]))
        weighted = row["paper_lambda_weighted"]
        log.info("  paper-λ weighted minutes/1000 steps: %s",
                 {k: round(v["minutes_per_run"], 2) for k, v in weighted.items() if k != "fractions"})
    return row


@torch.no_grad()
def _warm_up(backend: Backend) -> None:
    x = torch.zeros(1, *backend.latent_shape(64, 64), device=backend.device)
    backend.velocity(x, torch.full((1,), 0.5), backend.encode(["warm up"]), lora=False)
    device_sync(backend)()


def cli(argv=None) -> int:
    """``main`` as the shell runs it: Ctrl-C is told in a line, not a traceback."""
    try:
        return main(argv)
    except KeyboardInterrupt:  # every finished row is already in --out (_save after each)
        print("Stopped (Ctrl-C); every row finished before it is in --out, where one was given.", file=sys.stderr)
        return 130  # the shell's code for SIGINT


if __name__ == "__main__":
    sys.exit(cli())
