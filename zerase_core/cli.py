"""``python -m zerase_core``: inspect, merge and train erasure LoRAs without ComfyUI.

Each subcommand is a pair (``add`` its arguments, ``run`` it) in :data:`COMMANDS`; other
modules register theirs by importing :func:`command`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from .config import CHECKPOINTING_MODES, PRESETS, XT_SOURCES, TrainConfig
from .errors import STOPPED, ZEraseError
from .ctrl_c import other_stops_as_ctrl_c
from .lagrangian import MODES
from .lora import FP32_MAX, LoRAConfig, finite_in_fp32

log = logging.getLogger("zerase_core")

Adder = Callable[[argparse.ArgumentParser], None]
Runner = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Adder, Runner]] = {}


def command(name: str, help: str, add: Adder):
    """Register ``run`` as subcommand ``name`` with arguments from ``add``."""

    def register(run: Runner) -> Runner:
        COMMANDS[name] = (help, add, run)
        return run

    return register


def out_path(text: str) -> Path:
    """``--out`` as typed; an empty one is refused: Path("") is the current folder, which a run would fill."""
    if not text.strip():
        raise argparse.ArgumentTypeError("it is empty; name the folder (or file) the output goes to")
    return Path(text)


# --- inspect -------------------------------------------------------------------------------
def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="an erasure LoRA (.safetensors)")


@command("inspect", "print a LoRA file's metadata as JSON", _add_inspect)
def _inspect(args: argparse.Namespace) -> int:
    from .lora_file import load_lora, read_description

    lora = load_lora(args.file)  # refuses what is no erasure LoRA; an ungated one is shown (its gate says why not)
    # As stored (an older file shows its own format version); an official file stores none: as it is read.
    print_result(json.dumps(read_description(args.file) or lora.metadata(), indent=2, sort_keys=True))
    return 0


# --- merge ---------------------------------------------------------------------------------
def _add_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", type=Path, nargs="+", help="two or more erasure LoRAs")
    p.add_argument("--weights", type=float, nargs="+",
                   help="one weight per LoRA, above 0 and at most 20 (default 1/N each, the paper's: each concept is "
                        "erased less than by its LoRA alone; 1 each erases as the LoRAs applied together)")
    p.add_argument("--rank", type=int, help="re-rank the exact merge to this rank by SVD")
    p.add_argument("--out", type=out_path, required=True, help="output .safetensors (never overwritten)")


@command("merge", "merge erasure LoRAs (paper App. F): exact, or re-ranked by SVD", _add_merge)
def _merge(args: argparse.Namespace) -> int:
    from .files import check_writable
    from .lora_file import load_lora, save_lora
    from .merge import merge

    # "newdir/" reads as a file named newdir (Path drops the slash); ".safetensors" alone is a name with no suffix
    if args.out.suffix.lower() != ".safetensors":
        raise ZEraseError(f"--out names the merged LoRA file, ending in .safetensors (e.g. merged.safetensors); got "
                          f"{args.out}.")
    if os.path.lexists(args.out):
        raise ZEraseError(f"{args.out} exists; choose another --out (files are never overwritten).")
    merged, report = merge([load_lora(f) for f in args.files], args.weights, args.rank)
    check_writable(args.out)  # a name too long, a folder that cannot be written: refused by name, nothing made before
    save_lora(merged, args.out, exclusive=True)  # also if a file appeared there during the merge
    print_result(json.dumps({"out": str(args.out), "rank": report.rank, "relative_error": report.relative_error}))
    return 0


# --- compare -------------------------------------------------------------------------------
def _add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", type=Path, nargs="+", help="erasure LoRAs, applied together")
    p.add_argument("--model", type=Path, required=True, help="a diffusers Z-Image folder (with vae/)")
    p.add_argument("--prompts", nargs="+", required=True, help="one row of pictures per prompt")
    p.add_argument("--strengths", type=float, nargs="+", help="one per file (default 1 each)")
    p.add_argument("--seed", type=int, default=0, help="the noise of every row (default 0)")
    p.add_argument("--resolution", type=int, default=1024, help="pixels a side (default 1024)")
    p.add_argument("--steps", type=int, default=TrainConfig.sample_steps,
                   help=f"sampling steps (default {TrainConfig.sample_steps}, Turbo's)")
    p.add_argument("--out", type=out_path, required=True, help="output .png (never overwritten)")


@command("compare", "original | erased pictures of prompts on a diffusers Z-Image, LoRA files applied together",
         _add_compare)
def _compare(args: argparse.Namespace) -> int:
    from .comparison import compare_files
    from .files import check_writable

    if args.out.suffix.lower() != ".png":
        raise ZEraseError(f"--out names the picture, ending in .png (e.g. compare.png); got {args.out}.")
    if os.path.lexists(args.out):
        raise ZEraseError(f"{args.out} exists; choose another --out (files are never overwritten).")
    strengths = args.strengths or [1.0] * len(args.files)
    if len(strengths) != len(args.files):
        raise ZEraseError(f"--strengths gives {len(strengths)} values for {len(args.files)} files: give one per file.")
    if not finite_in_fp32(*strengths):  # LoRAConfig refuses them too, but at install_lora: after the loads
        raise ZEraseError(f"--strengths must be finite numbers (|x| ≤ {FP32_MAX:.1e}); got "
                          f"{' '.join(map(str, strengths))}.")
    # Sampling settings checked as a run's are (size, steps, seed); the concept is only a name here.
    sampling = TrainConfig(concept="compared", height=args.resolution, width=args.resolution, seed=args.seed,
                           sample_steps=args.steps)
    check_writable(args.out)
    out = compare_files(args.model, args.files, args.prompts, strengths, sampling, args.out)
    print_result(json.dumps({"out": str(out), "prompts": len(args.prompts), "files": [str(f) for f in args.files]}))
    return 0


# --- train ---------------------------------------------------------------------------------
# train --tiny's settings, where they differ from TrainConfig's: seconds on a CPU
TINY = dict(steps=50, height=64, width=64, sample_steps=4, lora=LoRAConfig(rank=4))


def _add_train(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tiny", action="store_true", help="a tiny randomly initialised diffusers Z-Image (CPU, seconds)")
    src.add_argument("--model", type=Path, help="a diffusers Z-Image folder (transformer/, text_encoder/, tokenizer/)")
    p.add_argument("--concept", required=True, help="the word or phrase to erase, as it appears in the prompts")
    p.add_argument("--preserve", nargs="*", default=[], help="preservation concepts (default: none)")
    p.add_argument("--template", dest="templates", action="append",
                   help="erase prompt template with {} (repeatable; default: the preset's, paper Table 7)")
    p.add_argument("--preset", default=TrainConfig.preset, choices=list(PRESETS),
                   help=f"concept type (sets ε, template; default {TrainConfig.preset})")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {TrainConfig.steps}; "
                   f"{TINY['steps']} with --tiny)")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW's learning rate α (default {TrainConfig.lr:g})")
    p.add_argument("--epsilon", type=float, default=None, help="ε of Eq. 9: the rise of L_pr a step may cause "
                   "(default: the preset's, Table 6)")
    p.add_argument("--beta", type=float, default=None, help="β of Eq. 15, how fast λ answers a rise of L_pr: "
                   f"the preservation knob (default {TrainConfig.beta:g})")
    p.add_argument("--eta", type=float, default=None,
                   help=f"η of Eq. 5, the erasing guidance (default {TrainConfig.eta:g})")
    p.add_argument("--attn-weight", type=float, default=None, help="weight of L_attn (Eq. 6) in L_er (Eq. 7: "
                   f"default {TrainConfig.attn_weight:g}; 0: L_erase alone, as ESD)")
    p.add_argument("--lambda-mode", default=None, choices=list(MODES),
                   help=f"the λ rule (default {TrainConfig.lambda_mode}: Algorithm 1's)")
    p.add_argument("--rank", type=int, default=None, help=f"LoRA rank (default {LoRAConfig.rank}; "
                   f"{TINY['lora'].rank} with --tiny)")
    p.add_argument("--targets", default=None, help="projections to adapt, e.g. qkv, qk or q,k (default "
                   f"{''.join(LoRAConfig.targets)})")
    p.add_argument("--resolution", type=int, default=None, help=f"training resolution in pixels, square (default "
                   f"{TrainConfig.height}; {TINY['height']} with --tiny)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed,
                   help=f"seeds the LoRA's init, the prompt order and x_t (default {TrainConfig.seed})")
    p.add_argument("--gradient-checkpointing", nargs="?", const="on", default=TrainConfig.gradient_checkpointing,
                   choices=CHECKPOINTING_MODES, help="auto (default): as few main layers as let a step fit the memory "
                   "free (estimated; as many as on from a step that runs out); on (also the flag alone): all but the "
                   "last (checkpointing it saves nothing), always; off: never")
    p.add_argument("--xt-source", default=None, choices=list(XT_SOURCES),
                   help="x_t: sampled every step (fresh, ESD) or from trajectories sampled once (pool, the default)")
    p.add_argument("--xt-pool", type=int, default=None, help=f"trajectories in the x_t pool (default "
                   f"{TrainConfig.xt_pool}; at least one per erase prompt)")
    p.add_argument("--out", type=out_path, default=Path("out/train"), help="the run's folder (default out/train)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")


def train_config_from_args(args: argparse.Namespace, **defaults):
    """A TrainConfig from CLI flags; unset flags keep TrainConfig's (or the caller's) defaults."""
    from .lora import targets_from

    lora = {}
    if args.rank is not None:
        lora["rank"] = args.rank
    if args.targets is not None:  # --targets '' is refused by LoRAConfig, not taken for "not given"
        lora["targets"] = targets_from(args.targets)
    flags = {
        "steps": args.steps,
        "lr": args.lr,
        "epsilon": args.epsilon,
        "beta": args.beta,
        "eta": args.eta,
        "attn_weight": args.attn_weight,
        "lambda_mode": args.lambda_mode,
        "templates": tuple(args.templates) if args.templates else None,
        "xt_source": args.xt_source,
        "xt_pool": args.xt_pool,
    }
    if args.resolution is not None:  # 0 is refused by TrainConfig, not taken for "not given"
        flags["height"] = flags["width"] = args.resolution
    chosen = defaults | {k: v for k, v in flags.items() if v is not None}
    if lora:  # the flags given over the caller's rank (the demo's 4), else LoRAConfig's defaults
        given = {"rank": chosen["lora"].rank} if "lora" in chosen else {}
        chosen["lora"] = LoRAConfig(**(given | lora))
    return TrainConfig(
        concept=args.concept, preserve=tuple(args.preserve), preset=args.preset, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, **chosen,
    )


@command("train", "train an erasure LoRA (Algorithm 1) on a tiny random or a diffusers Z-Image", _add_train)
def _train(args: argparse.Namespace) -> int:
    from .prompt_pool import check_erase_templates
    from .run import PlannedRun, train_and_save
    from .run_lock import run_lock

    # The settings and the run's folder are checked before a model is built: loading Z-Image takes minutes.
    if args.tiny:
        config = train_config_from_args(args, **TINY)
    else:
        from .backends.diffusers_loader import check_model_folder, check_size

        config = train_config_from_args(args)
        shift = check_model_folder(args.model)  # x_t as the model samples (there is no --shift flag)
        check_size(args.model, config.height, config.width)
        if shift is not None:
            config = dataclasses.replace(config, shift=shift)
    check_erase_templates(config)  # text only: the text encoder would take minutes to load and run first
    with run_lock(args.out):  # a refusal inside leaves no folder it made
        if args.tiny:
            from .tiny import tiny_zimage_backend

            backend, also_writes, afterwards = tiny_zimage_backend(seed=args.seed), (), lambda: None
        else:
            backend, also_writes, afterwards = _from_folder(args, config)
        result, path = train_and_save(PlannedRun(backend, config, args.out, args.resume, also_writes),
                                      release_encoder=not args.tiny)
        afterwards()
    last = result.history[-1]
    print_result(json.dumps({"lora": str(path), "steps": last.step, "L_erase": last.erase, "lambda": last.lam,
                             "seconds": round(result.seconds, 2)}))
    return 0


def _from_folder(args: argparse.Namespace, config: TrainConfig):
    """The diffusers Z-Image of ``--model``, the file the run writes beside its own, and what draws that file, the
    before/after picture with the folder's VAE, once the run is trained."""
    from .backends.diffusers_loader import load_decoder, load_diffusers_zimage
    from .comparison import GRID, comparison_texts, write_comparison
    from .run import check_folder

    check_folder(args.out, config, args.resume, (GRID,))  # before minutes of loading; PlannedRun adds the model's
    backend = load_diffusers_zimage(args.model)
    decode = load_decoder(args.model, backend.device, backend.dtype)  # a damaged vae/ is told before the run
    prompts = backend.encode(comparison_texts(config))  # now: the run releases the text encoder once it has its own
    return backend, (GRID,), lambda: write_comparison(backend, prompts, config, decode, args.out)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with other_stops_as_ctrl_c():
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    try:
        _load_plugins()  # seconds of imports (torch, diffusers): Ctrl-C lands here too
        parser = argparse.ArgumentParser(prog="python -m zerase_core", description=__doc__.splitlines()[0])
        sub = parser.add_subparsers(dest="command", required=True)
        for name, (help_text, add, _) in COMMANDS.items():
            add(sub.add_parser(name, help=help_text))
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # benchmarks record the command they ran
        return COMMANDS[args.command][2](args)
    except ZEraseError as err:
        print(f"error: {err}", file=sys.stderr)
        # a run stopped by Ctrl-C says what it kept (a ZEraseError); its exit code is still the shell's for SIGINT
        return 130 if isinstance(err.__cause__, KeyboardInterrupt) else 2
    except KeyboardInterrupt:  # outside a run's own handling: loading a model, a demo's measuring, a benchmark
        print(STOPPED, file=sys.stderr)
        return 130  # the shell's code for SIGINT
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else Python's flush at exit raises again
        return 141  # 128 + SIGPIPE: what a shell reports for a tool a closed pipe stopped


def print_result(text: str) -> None:
    """A command's result on stdout, printed after every file it writes. A full disk behind it is told in one line;
    a reader that went away is let through as BrokenPipeError, which :func:`_run` ends quietly."""
    try:
        print(text, flush=True)  # flushed here: at exit, a failed write would be a traceback
    except BrokenPipeError:
        raise
    except OSError as err:
        raise ZEraseError(f"Could not print the result: {err.strerror or err}. Every file the command writes (a "
                          "LoRA, a merge, a report, a benchmark's --out) is written: only this result line is lost, "
                          "and running the command again is not needed for them.") from err


def _load_plugins() -> None:
    """Import the modules that register further subcommands (toy demo, benchmarks)."""
    import importlib

    for module in ("zerase_core.toy.cli", "zerase_core.bench"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a missing dependency inside it is a real error
                raise
