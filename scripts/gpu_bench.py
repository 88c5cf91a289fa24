"""Z-Erase cost on a randomly initialised full-size Z-Image (no weights needed), on one GPU.

    python scripts/gpu_bench.py --out docs/bench/gpu.json          # one GPU with >= 40 GB (about 6 min on an H200)
    python scripts/gpu_bench.py --tiny                             # CPU, seconds: checks the script

Measures, side by side on the same model and batch (bf16 weights, rank-16 gated LoRA on the
main layers' q/k/v, 64 caption tokens), at 512² and 1024² with gradient checkpointing and at
512² also without (``--no-ckpt-resolutions``; an 80 GB card has room): for both x_t sources
(fresh ESD sampling, and the pool, the default) seconds per step of ours at λ > 0 and λ = 0
and of plain gated ESD with the same source, of the official-style reference, the per-part
split (x_t, teacher, student forward/backward, attention mass, AdamW), each variant's
peak GPU memory above the resident weights (torch.cuda.max_memory_allocated), and minutes
per 1000 steps — pool build or per-step sampling included, and weighed by how often the
paper's λ rule leaves λ > 0 on the toy (``paper_lambda_weighted``). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zerase_core.backends.diffusers_zimage import DiffusersZImageBackend, LatentSpec  # noqa: E402
from zerase_core.bench.cost import SpeedCase, _base_config, _sync, time_case  # noqa: E402
from zerase_core.bench.estimate import FixedLengthEncoder, scaled_zimage  # noqa: E402
from zerase_core.bench.report import write_json  # noqa: E402
from zerase_core.lora import LoRAConfig  # noqa: E402

log = logging.getLogger("gpu_bench")


@torch.no_grad()
def full_size_zimage(device: str) -> torch.nn.Module:
    """diffusers' Z-Image at its real size, random weights, bf16, built directly on the device."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel()  # the class defaults are the released model's sizes
    # bf16 while still on meta: to_empty in fp32 would first take 24.6 GB of the card
    model = model.to(torch.bfloat16).to_empty(device=device)
    norms = {f"{n}.weight" for n, m in model.named_modules() if "RMSNorm" in type(m).__name__}
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if name in norms:
            p.fill_(1.0)  # RMSNorm weights: identity, as trained models start (cap_embedder.0 is one too)
        else:
            p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="a scaled-down model on the CPU at 64², with and without checkpointing: checks the script")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant after one warm-up")
    parser.add_argument("--pool", type=int, default=32, help="trajectories in the x_t pool (the default TrainConfig)")
    parser.add_argument("--no-ckpt-resolutions", type=int, nargs="*", default=[512],
                        help="also measure these resolutions without gradient checkpointing")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.tiny:
        model, device, cap_dim, res, rank = scaled_zimage(256, 2, torch.float32), "cpu", 64, [64], 4
    else:
        if not torch.cuda.is_available():
            parser.error("no GPU: run with --tiny to check the script on a CPU")
        model, device, cap_dim, res, rank = full_size_zimage("cuda"), "cuda", 2560, args.resolutions, 16
    resident = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0
    backend = DiffusersZImageBackend(model.to(device), FixedLengthEncoder(cap_dim, 64),
                                     LatentSpec(channels=model.config.in_channels))
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "diffusers": diffusers.__version__, "weights_gib": resident, "caption_tokens": 64, "rank": rank,
              "rows": []}
    # Cheapest first, so a run cut off by the device's time limit has the 512² rows (the 10-minute question).
    no_ckpt = res if args.tiny else args.no_ckpt_resolutions  # the check runs both kinds of row
    runs = sorted([(px, True) for px in res] + [(px, False) for px in res if px in no_ckpt],
                  key=lambda run: (run[0], run[1]))
    _warm_up(backend)  # the device's one-off start (kernels, library handles) out of the first row's pool build
    for px, ckpt in runs:
        config = _base_config(height=px, width=px, xt_pool=args.pool, gradient_checkpointing=ckpt,
                              lora=LoRAConfig(rank=rank), shuffle_pool=2)
        backend.set_gradient_checkpointing(ckpt)
        image_tokens = math.prod(backend.latent_shape(px, px)[1:]) // backend.patch**2
        case = SpeedCase("z-image-random" if not args.tiny else "scaled-zimage", lambda: backend, config, image_tokens)
        result["rows"].append(_row(case, args.steps))
        write_json(result, args.out)  # after every row: a run cut off by a time limit keeps what it measured
    print(write_json(result, None))
    return 0


def _row(case: SpeedCase, steps: int) -> dict:
    """One resolution's measurements; a row that fails is recorded with its error and the run goes on to the next
    (there may be one device slot for the whole script)."""
    px, ckpt = case.config.height, case.config.gradient_checkpointing
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
def _warm_up(backend: DiffusersZImageBackend) -> None:
    x = torch.zeros(1, *backend.latent_shape(64, 64), device=backend.device)
    backend.velocity(x, torch.full((1,), 0.5), backend.encode(["warm up"]), lora=False)
    _sync(backend)()


if __name__ == "__main__":
    sys.exit(main())
