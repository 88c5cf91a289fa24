"""Z-Erase Train: MODEL + CLIP + concept -> erasure LoRA, erased MODEL, loss/λ curves, previews."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from comfy_api.latest import io, ui

from zerase_core import render
from zerase_core.backends.comfy_zimage import ComfyZImageBackend, as_tokenized, training_session
from zerase_core.apply import install_lora
from zerase_core.config import CHECKPOINTING_MODES, LR_RANGE, PRESETS, XT_SOURCES, TrainConfig
from zerase_core.history import StepRecord, loss_series, run_title
from zerase_core.lora import LoRAConfig, targets_from
from zerase_core.lora_file import load_lora
from zerase_core.named_run import NamedRun
from zerase_core.prompt_pool import check_erase_templates, first_erase_text
from zerase_core.prompts import EMPTY_CONCEPT, is_blank
from zerase_core.sampling import before_after
from zerase_core.trainer import ZEraseTrainer
from zerase_core.xt_pool import PoolCancelled

from . import _render
from .apply_lora import apply_erasure
from .common import ErasureLoRAType, check_vae, listed, node_id, output_folder, parse_list, show_text, told_as

NODE = "Z-Erase Train"
TARGETS = ["q,k,v", "q,k", "q,v", "k,v", "q", "k", "v"]  # every subset; the paper's first
log = logging.getLogger(__name__)


def build_config(concept, preset, templates, preserve, steps, learning_rate, beta, eta, epsilon, rank, targets,
                 resolution, seed, gradient_checkpointing, xt_source, shift) -> TrainConfig:
    # Concepts as the prompts they go into are read: "Mickey Mouse \(Disney\)" is found in its prompt.
    return TrainConfig(
        concept=as_tokenized(concept.strip()),
        preset=preset,
        templates=tuple(line.strip() for line in templates.splitlines() if line.strip()),
        preserve=tuple(as_tokenized(p) for p in parse_list(preserve, "preservation concepts")),
        steps=steps, lr=learning_rate, beta=beta, eta=eta,
        epsilon=None if epsilon < 0 else epsilon,
        height=resolution, width=resolution, seed=seed, gradient_checkpointing=gradient_checkpointing,
        xt_source=xt_source, shift=shift, lora=LoRAConfig(rank=rank, targets=targets_from(targets)),
    )


def _previews(backend, prompt, model, vae, config):
    """Before/after pictures of the first erase prompt from one noise (not the run's: see before_after)."""
    pictures = [render.to_pil(_render.decode(model, vae, backend.patcher.model.process_latent_out(x0))[0])
                for x0 in before_after(backend, prompt, config)]
    return render.grid([pictures], ["before", "after"], caption=prompt.text)


def _reused(cls, path: Path, backend: ComfyZImageBackend, model, vae, config) -> io.NodeOutput:
    """``backend``: a clone of the input MODEL with the CLIP, which renders the previews with the LoRA on."""
    lora = load_lora(path)
    log.info("Z-Erase: %s is a finished run of these settings on this model; using it (change the seed or the "
             "save_name to train again)", path.name)
    (prompt,) = backend.encode([first_erase_text(config)])
    install_lora(backend, lora, name=backend.key, frozen_in=False)  # the previews switch it: before | after
    previews = _previews(backend, prompt, model, vae, config)
    steps = config.steps  # finished_lora takes only files with every step done
    title = f"{run_title(config, steps)}\nreused: {listed(path)}"
    curves = render.curves(lora.history, title=title, steps=steps)
    return _outputs(cls, lora, curves, previews, model)


def _outputs(cls, lora, curves, previews, model) -> io.NodeOutput:
    """The node's outputs; the erased MODEL is made as Apply Erasure LoRA makes it, whether trained or reused."""
    shown = [ui.PreviewImage(image, cls=cls).values for image in (curves, previews)]  # on the node too, wired or not
    erased = apply_erasure(model, lora, 1.0, NODE)
    return io.NodeOutput(lora, erased, curves, previews, ui={"images": shown[0] + shown[1]})


def _progress_text(shown_on: str | None, steps: int, every: float = 0.5):
    """A step callback showing the step's losses and λ on the node (the curves come only after minutes of training):
    at most every ``every`` seconds, and the last step."""
    last = [-math.inf]

    def tell(record: StepRecord, trainer: ZEraseTrainer) -> None:
        now = time.monotonic()
        if now - last[0] < every and record.step < steps:
            return
        last[0] = now
        show_text(shown_on, f"step {record.step}/{steps} · L_erase {record.erase:.4g} · L_attn {record.attn:.3g} · "
                           f"L_pr {record.pr:.3g} · λ {record.lam:.3g}")

    return tell


def _trainer(backend, run: NamedRun, shown_on: str | None = None) -> tuple[ZEraseTrainer, NamedRun]:
    """The run's trainer, continued from its checkpoint when asked and one exists (and the run with the file its LoRA
    goes to). The node's bar counts the x_t pool's trajectories while they are sampled (minutes on a large model),
    then the training steps."""
    import comfy.model_management as mm
    import comfy.utils

    pool_bar = comfy.utils.ProgressBar(1)
    try:
        trainer = ZEraseTrainer(backend, run.config, should_stop=mm.processing_interrupted, release_encoder=True,
                                pool_progress=lambda done, n: pool_bar.update_absolute(done, n),
                                resume_from=run.continues)  # refuses other settings or another model, saying so
    except PoolCancelled:  # Cancel before the first step: nothing to save
        mm.throw_exception_if_processing_interrupted()
        raise
    pbar = comfy.utils.ProgressBar(run.config.steps)
    trainer.callbacks += [lambda record, t: pbar.update_absolute(t.step), _progress_text(shown_on, run.config.steps)]
    run = run.attach(trainer)
    if trainer.step:
        pbar.update_absolute(trainer.step)
        log.info("Z-Erase: resumed '%s' at step %d of %d", run.checkpoint.name, trainer.step, run.config.steps)
    return trainer, run


class ZEraseTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZEraseTrain",
            search_aliases=["concept erasure", "unlearn concept", "remove concept", "erase nudity", "erase style",
                            "safety LoRA"],
            display_name=NODE,
            category="Z-Erase",
            is_output_node=True,  # it writes the LoRA file, wired onward or not
            description="Trains a text-token-gated erasure LoRA on Z-Image (Z-Erase, Algorithm 1). Cancel keeps "
            "the last good LoRA; files land in models/loras/zerase/ and never overwrite another file (a resumed "
            "run replaces the LoRA its interrupted run saved).",
            inputs=[
                io.Model.Input("model", tooltip="Z-Image (Turbo) from Load Diffusion Model; not changed: the erased "
                               "model is a patched clone."),
                io.Clip.Input("clip", tooltip="Encodes the erase, preservation and empty prompts once."),
                io.String.Input("concept", default="cat", tooltip="The word or phrase to erase, as it appears in "
                                "prompts (e.g. 'nude', 'Van Gogh'); its tokens get the attention loss."),
                io.Combo.Input("preset", options=list(PRESETS), default=TrainConfig.preset,
                               tooltip="Concept type: sets ε (paper Table 6) and the default template."),
                io.String.Input("templates", default="", multiline=True,
                                tooltip="One erase prompt template per line with {} for the concept; "
                                "empty: the preset's."),
                io.String.Input("preserve", default="", tooltip="Comma-separated concepts that must stay, e.g. "
                                "'person' when erasing 'nude' (the paper always gives some). Empty: only the empty "
                                "prompt's predictions are kept (Eq. 8's first term)."),
                io.Int.Input("steps", default=TrainConfig.steps, min=1, max=100000,
                             tooltip="Training steps (the paper: 1000)."),
                # The frontend rounds a number to its step's decimals: a coarser step turned a small rate, β or ε into 0
                io.Float.Input("learning_rate", default=TrainConfig.lr, min=1e-6, max=LR_RANGE[1], step=1e-6,
                               tooltip="AdamW's α, also the Taylor step in λ's update (Eq. 15)."),
                io.Float.Input("beta", default=TrainConfig.beta, min=0.0, max=10.0, step=1e-4,
                               tooltip="β: how fast λ reacts to the preservation loss rising (Eq. 15). λ ends up "
                               "≈ (β/learning_rate)·L_pr: raise β to preserve more (README: Algorithm 1's λ, "
                               "written out)."),
                io.Float.Input("eta", default=TrainConfig.eta, min=0.0, max=20.0, step=0.1,
                               tooltip="η: negative guidance of the erase target (Eq. 5); higher erases harder."),
                io.Float.Input("epsilon", default=-1.0, min=-1.0, max=1.0, step=1e-5,
                               tooltip="ε, the preservation tolerance (Table 6); -1: the preset's. Under the paper's λ "
                               "rule it moves results little; β and the learning rate matter more."),
                io.Int.Input("rank", default=LoRAConfig.rank, min=1, max=256,
                             tooltip="LoRA rank (~44 MB at 16 on q,k,v)."),
                io.Combo.Input("targets", options=TARGETS, default=",".join(LoRAConfig.targets),
                               tooltip="Attention projections that carry the LoRA (on text tokens only)."),
                io.Int.Input("resolution", default=TrainConfig.height, min=16, max=2048, step=16,
                             tooltip="Square training size in pixels; memory grows with it (see README, VRAM)."),
                io.Int.Input("seed", default=TrainConfig.seed, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the LoRA's init, the prompt order and x_t. No randomize control: queueing "
                             "again reuses the trained LoRA instead of retraining."),
                io.String.Input("save_name", default="", tooltip="File name under models/loras/zerase/ (empty: the "
                                "concept). Never overwrites: a taken name gets _001, _002, …; resume finds its run "
                                "by this name."),
                io.Combo.Input("gradient_checkpointing", options=list(CHECKPOINTING_MODES),
                               default=TrainConfig.gradient_checkpointing,
                               tooltip="Saves most activation memory for up to a third more time per step: at 512² "
                               "on the real model it is what fits a 16 GB card. auto: from the start, as few main "
                               "layers as let a step fit the memory free on the device (estimated), or as many as on "
                               "from a step that runs out of memory (same gradients). on: all but the last (whose "
                               "checkpointing saves nothing), always. off: never (README, VRAM)."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue an interrupted run of this save_name (cancelled, crashed, "
                                 "ComfyUI restarted) with the same settings from its last checkpoint (every "
                                 f"{TrainConfig.checkpoint_every} steps and at Cancel); starts fresh when there is "
                                 "none. The finished LoRA replaces the one saved at Cancel."),
                # After resume: workflows saved before this input keep their widget values in place.
                io.Combo.Input("xt_source", options=list(XT_SOURCES), default=TrainConfig.xt_source,
                               tooltip="pool: x_t from the original model's trajectories, sampled once (about half "
                               "the time). fresh: sampled every step by the model being trained, as ESD does; "
                               "erased more on the toy, with more collateral change (README)."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the previews; without it a cheap preview."),
            ],
            hidden=[io.Hidden.unique_id],  # the node its progress text goes to
            outputs=[
                ErasureLoRAType.Output(display_name="erasure_lora"),
                io.Model.Output(display_name="erased_model"),
                io.Image.Output(display_name="curves"),
                io.Image.Output(display_name="previews"),
            ],
        )

    @classmethod
    def validate_inputs(cls, concept) -> bool | str:
        """ComfyUI's check of a queued prompt, before any loader runs: an empty concept is told in a moment, not
        after the model and the text encoder are read (minutes on Z-Image). Only the concept: ComfyUI files a
        failure here under every input this function takes, so each one would carry it; the rest is checked at
        the start of execute."""
        if concept is not None and is_blank(concept):  # None: it comes from a link, checked in execute
            return EMPTY_CONCEPT
        return True

    @classmethod
    def execute(cls, model, clip, concept, preset, templates, preserve, steps, learning_rate, beta, eta, epsilon,
                rank, targets, resolution, seed, save_name,
                gradient_checkpointing=TrainConfig.gradient_checkpointing, resume=False,
                xt_source=TrainConfig.xt_source, vae=None) -> io.NodeOutput:
        import comfy.model_management as mm

        with told_as(NODE):  # every refusal before the work under the node's name, as the other nodes' are
            probe = ComfyZImageBackend(model, clip, node=NODE)  # a clone: the input's architecture, digest and shift
            check_vae(vae, probe.latent_channels)
            # x_t on the σ schedule the model samples with (ModelSamplingAuraFlow's shift when it is patched)
            config = build_config(concept, preset, templates, preserve, steps, learning_rate, beta, eta, epsilon,
                                  rank, targets, resolution, seed, gradient_checkpointing, xt_source, probe.flow_shift)
            check_erase_templates(config, as_tokenized)  # before the model is loaded for training and the prompts run
            run = NamedRun.plan(output_folder(), save_name, config, resume)  # names checked before any work
            finished = run.finished(probe)  # the file an earlier run of these settings saved, all steps done
            if finished is None:
                run.check(probe, "Turn resume on to continue it; to start over instead, choose another save_name or "
                          "delete that file.")
        shown_on = node_id(cls)  # what it shows goes on this node (show_text)
        if finished is not None:
            show_text(shown_on, f"{listed(finished)}: a finished run of these settings on this model, reused")
            return _reused(cls, finished, probe, model, vae, config)
        backend = ComfyZImageBackend.for_training(model, clip, node=NODE)
        with training_session(backend):
            trainer, run = _trainer(backend, run, shown_on)
            path = run.lora
            try:
                result = trainer.run()
            except BaseException:
                if trainer.has_progress():
                    path = run.save(trainer.export())
                    log.warning("Z-Erase: training stopped at step %d; saved the last good LoRA to %s",
                                trainer.step, path)
                    show_text(shown_on, f"stopped at step {trainer.step}; the LoRA so far: {listed(path)}")
                raise
        if trainer.step > 0:  # a LoRA of zero steps is the base model: no file for it
            path = run.save(result.lora)
            show_text(shown_on, f"{'saved' if result.completed else 'cancelled; the LoRA so far'}: {listed(path)} "
                               f"({trainer.step} of {config.steps} steps)")  # its name may carry _001: Apply lists it
        if not result.completed:
            log.warning("Z-Erase: cancelled at step %d (LoRA so far saved when > 0: %s)", trainer.step, path)
            mm.throw_exception_if_processing_interrupted()
        note = trainer.checkpointing.auto_note()
        note = f", {note}" if note else ""
        # the file's name on the curves too: v0.18.1's frontend shows no node text, and a taken name gets _001
        title = f"{run_title(config, len(result.history))}, {result.seconds:.0f}s{note}\nsaved: {listed(path)}"
        curves = render.curves(loss_series(result.history), title=title)
        previews = _previews(backend, trainer.prompts.erase[0], model, vae, config)
        return _outputs(cls, result.lora, curves, previews, model)
