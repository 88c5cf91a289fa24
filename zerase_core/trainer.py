"""Algorithm 1 of the paper: Z-Erase training of a gated LoRA under an adaptive λ.

Per step (defaults from :class:`TrainConfig`):

1. pick an erase prompt c_er (templates and word-shuffled variants) and a preservation
   prompt c_pr, and x_t reached from noise with c_er (ESD style): ``xt_source="fresh"``
   samples it now, through the model being trained; ``"pool"`` draws it from trajectories
   the frozen model sampled once (:mod:`.xt_pool`), where the teacher's predictions were
   computed too;
2. fresh: one no-grad teacher forward for v_θ(x_t, c_er), v_θ(x_t, ∅), v_θ(x_t, c_pr);
3. student predictions with the LoRA: c_er (with attention capture) and [∅, c_pr] — one
   batched forward when λ is expected to weigh L_pr (λ_t > 0, ``exact``, fixed λ > 0), else
   c_er with a graph and [∅, c_pr] under ``torch.no_grad()``: while λ_t = 0 L_pr's value is
   needed only for g̃, so no graph is built for it;
4. L_er = L_erase + L_attn (Eq. 5-7), L_pr (Eq. 8); λ from the chosen rule; AdamW step on
   L_er + λ L_pr. If λ_{t+1} > 0 although λ_t = 0, L_pr is recomputed with a graph for that
   step (``StepRecord.pr_recomputed``); nothing is back-propagated that cannot change the update.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Protocol, Sequence

import torch

from .apply import export_lora
from .backends.base import Backend
from .config import TrainConfig
from .errors import ZEraseError
from .ctrl_c import ctrl_c_deferred, stops
from .checkpoint import load_checkpoint, save_checkpoint
from .gradient_checkpointing import GradientCheckpointing, StepShape
from .history import StepRecord, TrainResult, stored_series
from .lagrangian import direction, rule_for
from .lora_file import ErasureLoRA
from .objectives import loss_attn, loss_er, loss_erase, loss_pr, loss_total
from .out_of_memory import is_out_of_memory, release, told_as_out_of_memory
from .prompt_pool import PromptPool
from .prompts import EncodedPrompt
from .sampling import euler, flow_sigmas
from .xt_pool import TrajectoryPool

log = logging.getLogger(__name__)


class NonFiniteLoss(ZEraseError):
    """Training produced NaN or inf; the LoRA was left at its last good state."""


class StepCallback(Protocol):
    def __call__(self, record: StepRecord, trainer: "ZEraseTrainer") -> None: ...


class Teacher(NamedTuple):
    """The frozen model's predictions at a step's x_t, from one no-grad forward over [c_er, ∅, (c_pr)]."""

    concept: torch.Tensor  # v_θ(x_t, c_er)
    uncond: torch.Tensor  # v_θ(x_t, ∅)
    keep: torch.Tensor | None  # v_θ(x_t, c_pr), when the step has a preservation prompt

    @classmethod
    def rows(cls, v: torch.Tensor) -> "Teacher":
        """The teacher of the batched forward's rows (a step without c_pr has two)."""
        return cls(v[0:1], v[1:2], v[2:3] if len(v) > 2 else None)


@dataclass(frozen=True)
class PrBatch:
    """Eq. 8's inputs of one step. Kept for the step's update: L_pr is recomputed from them with a graph when λ turns
    > 0 although it ran without one, and the paired λ rule measures it again after the update."""

    x_t: torch.Tensor
    sigma: torch.Tensor
    keep: EncodedPrompt | None
    teacher: Teacher


class StepDraw(NamedTuple):
    """Algorithm 1's draws for one step: c_er with its concept's token indices, c_pr (None: no preservation
    concepts); from the pool also x_t, σ and the frozen teacher's predictions there (None: fresh, sampled in the step).
    In :meth:`ZEraseTrainer._losses`'s argument order."""

    erase: EncodedPrompt
    tokens: list[int]
    keep: EncodedPrompt | None
    x_t: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    teacher: torch.Tensor | None = None


class StepLosses(NamedTuple):
    erase: torch.Tensor  # L_erase (Eq. 5)
    attn: torch.Tensor  # L_attn (Eq. 6)
    pr: torch.Tensor  # L_pr (Eq. 8), with a graph only when its gradient was expected to count
    pr_batch: PrBatch  # its inputs, the step's x_t and σ among them


class ZEraseTrainer:
    """Owns one training run: prompt pool, installed LoRA, optimizer, λ, RNG, history."""

    def __init__(
        self,
        backend: Backend,
        config: TrainConfig,
        callbacks: Sequence[StepCallback] = (),
        should_stop: Callable[[], bool] | None = None,
        checkpoint_path: str | Path | None = None,
        release_encoder: bool = False,
        pool_progress: Callable[[int, int], None] | None = None,
        resume_from: str | Path | None = None,
    ):
        """``resume_from``: a checkpoint to continue, read before the x_t pool is sampled (minutes on the real model),
        which a run with every step done does not need."""
        config.lora.check_width(backend.fingerprint().get("dim"))  # before any work
        self.latent_shape = backend.latent_shape(config.height, config.width)  # refuses a resolution before any work
        self.backend, self.config = backend, config
        self.callbacks, self.should_stop = list(callbacks), should_stop
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.prompts = PromptPool.build(backend, config)  # the only use of the text encoder
        if release_encoder:  # before the LoRA and the x_t pool take their memory
            backend.release_encoder()
        # What the model is beyond its architecture (None where the host cannot tell), before this run's LoRA.
        self.base_digest = backend.base_digest()
        with torch.random.fork_rng(devices=[]):  # LoRA A's random init, by the run's seed; global RNG untouched
            torch.random.default_generator.manual_seed(config.seed)
            self.lora = backend.install(config.lora, "zerase")
        self.params = [p.requires_grad_(True) for p in self.lora.parameters()]
        # §5.1 names AdamW at α and gives no weight decay; we keep torch's default 0.01, written out so that it is a
        # choice, not an accident.
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.01)
        self.lambda_rule = rule_for(config)
        self.rng = random.Random(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.seconds, self.history = 0.0, []
        self.checkpoint_meta: dict = {}  # the caller's notes, kept in every checkpoint (the node: its LoRA's name)
        self.mass_layers = set(config.lora.layer_indices(backend.n_layers))
        self.sigmas = flow_sigmas(config.sample_steps, config.shift)
        self.checkpointing = GradientCheckpointing(backend, config.gradient_checkpointing)
        self.torn = False  # out of memory inside AdamW's update moved part of the LoRA (see has_progress)
        if resume_from is not None:
            self.resume(resume_from)
        wants_pool = config.xt_source == "pool" and self.step < config.steps
        self.xt_pool = self.build_pool(should_stop, pool_progress) if wants_pool else None

    def build_pool(self, should_stop: Callable[[], bool] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> TrajectoryPool:
        """The x_t pool of this run's prompts, sampler and seed (xt_pool.py)."""
        c = self.config
        return TrajectoryPool(self.backend, self.prompts.erase, self.prompts.uncond, self.prompts.keep,
                              self.latent_shape, self.sigmas, c.xt_pool, c.sample_cfg, c.seed,
                              should_stop=should_stop, progress=progress)

    # --- a step's parts; public, since the benches build their yardstick steps from the same parts -------
    def draw(self) -> StepDraw:
        """This step's erase prompt, its concept tokens and a preservation prompt; from the pool also x_t, σ and
        the teacher's predictions there (fresh: :meth:`_losses` samples them)."""
        if self.xt_pool is None:
            return StepDraw(*self.prompts.draw(self.rng))
        d = self.xt_pool.draw(self.rng, self.gen, self.backend.device)
        return StepDraw(*self.prompts.pick(d.erase_index, d.keep_index), d.x_t, d.sigma, d.teacher)

    def pr_prompts(self, keep: EncodedPrompt | None) -> list[EncodedPrompt]:
        """Eq. 8's prompts: ∅, and the preservation prompt c_pr when there is one."""
        return [self.prompts.uncond, *([keep] if keep else [])]

    def sample_xt(self, prompt: EncodedPrompt) -> tuple[torch.Tensor, torch.Tensor]:
        """ESD-style x_t: Euler from pure noise to a random σ_k with the erase prompt, by the model being trained.

        As ESD (quick_sample_till_t samples with the fine-tuned model) and the official Z-Erase code (the LoRA on
        while sampling) do: the LoRA learns on the states the erased model itself visits. Only the targets come
        from the frozen model (:meth:`teacher_predictions`). The pool, sampled once before training, is the frozen
        model's.
        """
        noise = torch.randn((1, *self.latent_shape), generator=self.gen).to(self.backend.device)
        k = int(torch.randint(0, self.config.sample_steps, (1,), generator=self.gen))
        x_t = euler(self.backend, noise, self.sigmas[: k + 1], [prompt], uncond=[self.prompts.uncond],
                    cfg=self.config.sample_cfg, lora=True)
        return x_t, self.sigmas[k].reshape(1)

    def teacher_predictions(self, x_t, sigma, prompts: list[EncodedPrompt]) -> torch.Tensor:
        """The frozen model's v_θ(x_t, c) for each prompt, in one no-grad forward."""
        with torch.no_grad():
            n = len(prompts)
            v, _ = self.backend.velocity(x_t.expand(n, -1, -1, -1), sigma.expand(n), prompts, lora=False)
        return v

    # --- one step ------------------------------------------------------------------------
    def _losses(self, er, tokens, keep, x_t=None, sigma=None, teacher=None) -> StepLosses:
        """L_erase, L_attn and L_pr at x_t (sampled fresh when not given) for one erase prompt."""
        config = self.config
        pr_prompts = self.pr_prompts(keep)
        if x_t is None:
            x_t, sigma = self.sample_xt(er)
        if teacher is None:
            teacher = self.teacher_predictions(x_t, sigma, [er, *pr_prompts])
        want_mass = config.attn_weight > 0
        v_er, v_pr, mass = self._student(er, tokens, pr_prompts, x_t, sigma, want_mass)
        batch = PrBatch(x_t, sigma, keep, Teacher.rows(teacher.to(v_er.device)))
        if v_pr is None:
            # λ = 0 is expected: L_pr's value is needed (for g̃), its graph is not. If λ turns out > 0 in this
            # step, _backward recomputes L_pr with a graph from the same batch.
            with torch.no_grad():
                l_pr = self._pr_loss(batch)
        else:
            l_pr = _l_pr(v_pr, batch)
        l_erase = loss_erase(v_er, batch.teacher.uncond, batch.teacher.concept, config.eta)
        l_attn = loss_attn(mass) if want_mass else l_erase.new_zeros(())
        return StepLosses(l_erase, l_attn, l_pr, batch)

    def _student(self, er, tokens, pr_prompts, x_t, sigma, want_mass: bool):
        """(v_{θ+Δθ}(x_t, c_er), the [∅, c_pr] predictions or None, c_er's attention mass or None) in one forward.

        The [∅, c_pr] rows join c_er's only when L_pr's gradient is expected to count (λ > 0): every prediction
        with a gradient then comes from one forward/backward. While λ = 0 only c_er's row runs here."""
        if not self.lambda_rule.needs_pr_gradient():
            v_er, mass = self.backend.velocity(x_t, sigma, [er], lora=True, mass_layers=self.mass_layers,
                                               concept_tokens=[tokens] if want_mass else None)
            return v_er, None, mass
        n = len(pr_prompts)
        v, mass = self.backend.velocity(
            x_t.expand(n + 1, -1, -1, -1), sigma.expand(n + 1), [er, *pr_prompts], lora=True,
            concept_tokens=[tokens] + [[]] * n if want_mass else None, mass_layers=self.mass_layers,
        )
        return v[:1], v[1:], (mass[:1] if want_mass else None)

    def _pr_loss(self, batch: PrBatch) -> torch.Tensor:
        """L_pr (Eq. 8) from the student's [∅, c_pr] predictions in one batched forward."""
        prompts = self.pr_prompts(batch.keep)
        n = len(prompts)
        v_pr, _ = self.backend.velocity(batch.x_t.expand(n, -1, -1, -1), batch.sigma.expand(n), prompts, lora=True)
        return _l_pr(v_pr, batch)

    def _backward(self, l_er: torch.Tensor, l_pr: torch.Tensor, pr_value: float,
                  batch: PrBatch) -> tuple[float, bool]:
        """Set .grad on the LoRA parameters by the λ rule; return the λ used and whether L_pr was recomputed."""
        if self.lambda_rule.from_gradients:
            g_er = _flat_grad(l_er, self.params, retain_graph=True)  # L_pr shares the batched student graph
            g_pr = _flat_grad(l_pr, self.params)
            lam = self.lambda_rule.solve(g_er, g_pr)
            _assign_flat_grad(direction(g_er, g_pr, lam), self.params)
            return lam, False
        lam = self.lambda_rule.update(pr_value)
        recomputed = lam > 0 and not l_pr.requires_grad
        if recomputed:  # λ_t = 0 but λ_{t+1} > 0: L_pr ran without a graph; rerun it with one (rare)
            l_pr = self._pr_loss(batch)
        loss_total(l_er, l_pr, lam).backward()
        return lam, recomputed

    def train_step(self) -> StepRecord:
        """One step of Algorithm 1 (:meth:`_step`) under the run's gradient checkpointing (gradient_checkpointing.py):
        auto's estimate before the first step, and a step that runs out of memory taken again with all main layers
        checkpointed that are worth it (all but the last).

        The failed step left the run as it was (:meth:`_step`), so the retry is the step an uninterrupted run takes.
        Out of memory inside AdamW's own update (not undone but under the paired rule; unlikely, as the step's
        activations are freed by then) is not retried. Every device's out of memory is raised as
        ``torch.OutOfMemoryError`` (out_of_memory.py).
        """
        self.checkpointing.before_step(self.step + 1, self._step_shape)
        start = time.perf_counter()
        try:
            return self._step()
        except torch.OutOfMemoryError as err:
            if not self._retried(err):
                raise
            release(err)  # its frames hold the failed forward's activations, whatever else still holds the error
        # Outside the except clause, which held the error: the retry needs the failed forward's room. (What a failed
        # backward leaves inside autograd's engine may outlive this; the retry's own backward releases it.)
        self.seconds += time.perf_counter() - start  # the failed attempt is part of the run's time
        self.checkpointing.after_out_of_memory(self.step + 1)
        return self._step()

    def _step_shape(self) -> StepShape:
        """This run's step as the memory estimate takes it: image tokens, the longest caption, student rows."""
        prompts = self.prompts
        caption = max(p.n_tokens for p in (*prompts.erase, prompts.uncond, *prompts.keep))
        image = self.backend.image_tokens(self.config.height, self.config.width)
        return StepShape(image, caption, 2 + bool(prompts.keep))

    @told_as_out_of_memory()  # every device's out of memory as torch.OutOfMemoryError, for train_step's retry
    def _step(self) -> StepRecord:
        """One iteration of Algorithm 1:

        1. c_er ~ D_er, c_pr ~ D_pr and x_t (:meth:`draw`; fresh x_t: :meth:`sample_xt` in :meth:`_losses`);
        2. L_erase (Eq. 5), L_attn (Eq. 6) and L_pr (Eq. 8) (:meth:`_losses`): in one student forward when λ will
           weigh L_pr; else c_er's with a graph and [∅, c_pr]'s without one (:meth:`_student`, :meth:`_pr_loss`);
        3. L_er = L_erase + L_attn (Eq. 7, ``loss_er``);
        4. λ by its rule (Eq. 15, or 11-12) and one AdamW step on L_total = L_er + λ L_pr (:meth:`_descend`,
           :meth:`_backward`).

        (:meth:`train_step` runs it under the run's gradient checkpointing: auto's estimate, out of memory taken
        again.)

        A step that fails before its update (NaN, out of memory, a cancel) leaves the run as it was before it, random
        generators included, so the checkpoint then saved resumes into the same step an uninterrupted run takes; under
        the paired λ rule, whose forward after the update may fail too, the update is undone (:class:`_OptimizerUndo`,
        taken before AdamW's step, so a failure inside that step is undone too); under the other rules a failure
        inside AdamW's own step is not."""
        start = time.perf_counter()
        draws = self.rng.getstate(), self.gen.get_state()
        # From AdamW's update to the step's record, a Ctrl-C waits (command line only: the main thread): stopped in
        # between, the LoRA was a step ahead of the record, and the checkpoint resumed into another run.
        with ExitStack() as update_to_record:
            try:
                losses = self._losses(*self.draw())
                values = _values(losses)
                if not all(map(math.isfinite, values.values())):
                    raise NonFiniteLoss(self._nan_message(values))
                l_er = loss_er(losses.erase, losses.attn, self.config.attn_weight)
                lam, recomputed = self._descend(l_er, losses.pr, values["L_pr"], losses.pr_batch,
                                                update_to_record=update_to_record)
            except BaseException:
                self.rng.setstate(draws[0])
                self.gen.set_state(draws[1])
                raise
            elapsed = time.perf_counter() - start
            record = StepRecord(
                self.step + 1, values["L_erase"], values["L_attn"], values["L_pr"], lam, self.lambda_rule.last_g,
                float(losses.pr_batch.sigma), elapsed, recomputed,
            )
            self.history.append(record)  # the step is done
            self.seconds += elapsed
        return record

    @property
    def step(self) -> int:
        """Steps done: read off the history, so a stop between two statements cannot save one without the other (a
        checkpoint whose step and history disagree is refused as damaged)."""
        return len(self.history)

    def _descend(self, l_er: torch.Tensor, l_pr: torch.Tensor, pr_value: float, batch: PrBatch, *,
                 update_to_record: ExitStack) -> tuple[float, bool]:
        """One AdamW update of the LoRA along the λ rule's direction; returns the λ used and whether L_pr was
        recomputed.

        A failed step (NaN gradient, out of memory, a cancel from a hook) moves neither the LoRA nor λ:
        the checkpoint keeps the last good state.
        """
        lam_before, undo, held = self.lambda_rule.state(), None, []
        try:
            lam, recomputed = self._backward(l_er, l_pr, pr_value, batch)
            if not _all_finite([p.grad for p in self.params if p.grad is not None]):
                raise NonFiniteLoss(self._nan_message({"gradient": float("nan")}))
            if self.lambda_rule.observes_update:
                pr_before = self._pr_before(l_pr, pr_value, batch)
                undo = _OptimizerUndo(self.optimizer)  # the after-update forward below may still fail
            held = update_to_record.enter_context(ctrl_c_deferred())  # see _step; a failure after it still undoes
            self._optimizer_step(undoable=undo is not None)
            if self.lambda_rule.observes_update:
                pr_after = self._pr_after(batch, pr_before)
        except BaseException as err:
            if undo is not None:
                undo.restore()
            self.lambda_rule.load_state(lam_before)
            if stops(held) and self._retried(err):  # taking the step again would lose the Ctrl-C held back
                raise KeyboardInterrupt from err
            raise
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        if self.lambda_rule.observes_update:
            self.lambda_rule.observe(pr_before, pr_after)
        return lam, recomputed

    def _optimizer_step(self, undoable: bool) -> None:
        """AdamW's update. Out of memory inside it, where nothing can undo it, marks the run torn and is not retried:
        AdamW may have moved part of the LoRA, and taking the step again would move that part twice."""
        try:
            with told_as_out_of_memory():
                self.optimizer.step()
        except torch.OutOfMemoryError as err:
            if not undoable:
                self.torn = True
                raise _OutOfMemoryInUpdate(str(err)) from err
            raise

    def _pr_after(self, batch: PrBatch, pr_before: float) -> float:
        """L_pr of the same batch after the update: what d_t did to it (Eq. 14). A non-finite pair is refused (a NaN
        in g̃ would set λ to 0 without a word)."""
        with torch.no_grad():
            pr_after = self._pr_loss(batch).item()
        if not math.isfinite(pr_before) or not math.isfinite(pr_after):
            raise NonFiniteLoss(self._nan_message({"L_pr before the update": pr_before, "L_pr after it": pr_after}))
        return pr_after

    def _retried(self, err: BaseException) -> bool:
        """Whether :meth:`train_step` takes a step that failed with ``err`` again: out of memory under auto, but not
        inside AdamW's update, which may have moved part of the LoRA."""
        return (is_out_of_memory(err) and not isinstance(err, _OutOfMemoryInUpdate)
                and self.checkpointing.can_retry())

    def _pr_before(self, l_pr: torch.Tensor, pr_value: float, batch: PrBatch) -> float:
        """L_pr of the step's batch before the update, measured as the after-update value will be."""
        if not l_pr.requires_grad:
            return pr_value
        # L_pr came from the batched, mass-recording forward; the after-update value comes from _pr_loss.
        # Other call shapes run other kernels (≈ 1e-6 apart in bf16, the size of ε·α): measure both alike.
        with torch.no_grad():
            return self._pr_loss(batch).item()

    def _nan_message(self, values: dict[str, float]) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        return (
            f"Training produced a non-finite value at step {self.step + 1} ({shown}). The LoRA keeps its last "
            "good weights and no file with NaNs is written. Lower the learning rate or η, or load the model in fp32 "
            "where it ran in fp16."
        )

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> TrainResult:
        completed, start = True, self.step
        try:
            while self.step < self.config.steps:
                if self.should_stop is not None and self.should_stop():
                    completed = False
                    break
                record = self.train_step()
                for callback in self.callbacks:
                    callback(record, self)
                if self.checkpoint_path and self.step % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
            # the last step's checkpoint, unless the loop saved it (a multiple) or ran no step (a finished run resumed)
            if self.checkpoint_path and self.step > start and self.step % self.config.checkpoint_every:
                self.save_checkpoint()  # in the try: Ctrl-C while it is written is answered by writing it again
        except BaseException as err:
            # Cancel (ComfyUI raises from its progress hook), NaN or a crash: keep the last good state.
            if self.checkpoint_path and self.has_progress():  # step 0 holds nothing to resume
                with ctrl_c_deferred(stopping=True):  # a second Ctrl-C would abort it; the run stops with ``err``
                    self.save_checkpoint(non_finite_stop=isinstance(err, NonFiniteLoss))
            raise
        if self.step >= self.config.steps:
            # No step draws from the pool again (a finished run resumed builds none): its host memory, about 1 GB at
            # 1024², is free for what follows, the node's previews.
            self.xt_pool = None
        return TrainResult(self.export(), tuple(self.history), self.seconds, completed)

    def params_finite(self) -> bool:
        return _all_finite(self.params)

    def has_progress(self) -> bool:
        """Whether the run holds something worth keeping when it stops: a step done, no NaN in the LoRA, and no
        update half applied. A torn run saves nothing: its last checkpoint (the run as it was there) resumes
        exactly, where one saved now would hold the half-applied update."""
        return self.step > 0 and self.params_finite() and not self.torn

    def export(self) -> ErasureLoRA:
        """The current LoRA as a self-describing :class:`ErasureLoRA`."""
        if not self.params_finite():
            raise NonFiniteLoss("The LoRA holds NaN or inf weights; refusing to export it.")
        training = self.config.to_dict() | {"steps_done": self.step, "seconds": round(self.seconds, 3)}
        if self.base_digest is not None:
            training["base"] = self.base_digest
        return export_lora(
            self.lora,
            concept=self.config.concept,
            preserve=self.config.preserve,
            fingerprint=self.backend.fingerprint(),
            training=training,
            history=stored_series(self.history),
        )

    def save_checkpoint(self, path: str | Path | None = None, non_finite_stop: bool = False) -> Path:
        """The run's state; ``non_finite_stop`` marks a run a NaN stopped, which a new run may replace (resuming it
        would repeat the step that failed)."""
        return save_checkpoint(self, Path(path or self.checkpoint_path), non_finite_stop)

    def resume(self, path: str | Path) -> None:
        load_checkpoint(self, Path(path))


class _OutOfMemoryInUpdate(torch.OutOfMemoryError):
    """Out of memory inside AdamW's update, which may have moved part of the LoRA: the step cannot be taken again."""


class _OptimizerUndo:
    """The optimizer's parameters and state as they are now, to put back if the step that follows fails.

    Only the paired λ rule needs it (a forward after the update can fail); a copy of the LoRA and AdamW's buffers
    (0.12 GiB at rank 16 on the real model).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.live = [p for group in optimizer.param_groups for p in group["params"]]
        self.saved = [p.detach().clone() for p in self.live]
        self.state = copy.deepcopy(optimizer.state_dict())

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.live, self.saved):
                p.copy_(saved)
        self.optimizer.load_state_dict(self.state)


def _l_pr(v_pr: torch.Tensor, batch: PrBatch) -> torch.Tensor:
    """L_pr from the student's [∅, (c_pr)] rows against the teacher's."""
    keep = batch.keep is not None
    return loss_pr(v_pr[:1], batch.teacher.uncond, v_pr[1:] if keep else None, batch.teacher.keep if keep else None)


def _values(losses: StepLosses) -> dict[str, float]:
    """The step's loss values, read in one host sync (each .item() is one)."""
    parts = (losses.erase, losses.attn, losses.pr)
    read = torch.stack([t.detach().to(parts[0].device) for t in parts]).tolist()
    return dict(zip(("L_erase", "L_attn", "L_pr"), read))


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """One host sync and a few kernels for all tensors: a rank-16 LoRA on 30 layers has 180 factors, and a check per
    factor launched ~900 kernels a step (the copy into one vector is 44 MB there, beside a step of gigabytes)."""
    return not tensors or bool(torch.cat([t.detach().reshape(-1) for t in tensors]).isfinite().all())


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool = False) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _assign_flat_grad(flat: torch.Tensor, params: list[torch.Tensor]) -> None:
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
