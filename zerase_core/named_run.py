"""A training run saved by name into a LoRA folder, as the Train node saves it (the command line's one folder per
run is :mod:`.run`).

The name never overwrites: a taken one gets ``_001``, ``_002``, …. Each name keeps a hidden checkpoint while its
run is unfinished. A finished file of the same settings on the same model is taken instead of training again, and
a resumed run's finished LoRA replaces the partial one its stopped run saved, so a stopped and resumed run leaves
one file.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .backends.base import Backend
from .checkpoint import check_run_files
from .config import TrainConfig
from .errors import ZEraseError
from .lora_file import ErasureLoRA, save_lora, save_new
from .run_files import finished_lora, partial_lora
from .save_names import name_from, path_inside, safe_output_path, saved_versions, stem
from .trainer import ZEraseTrainer

# Beside the LoRAs (ComfyUI empties its temp folder at start-up), with a suffix no loader lists.
CHECKPOINTS, CHECKPOINT_SUFFIX = ".checkpoints", ".zerase-ckpt"
LORA_FILE = "lora_file"  # the checkpoint's note of where the run's LoRA goes


@dataclass(frozen=True)
class NamedRun:
    folder: Path
    name: str  # the save name, as typed (subfolders allowed) or made from the concept
    config: TrainConfig
    resume: bool
    lora: Path  # where the LoRA goes: the next free name, or the partial file of the stopped run this one continues
    checkpoint: Path
    replaces_partial: bool = False  # ``lora`` is that partial file, which the finished run replaces

    @classmethod
    def plan(cls, folder: Path, save_name: str, config: TrainConfig, resume: bool) -> "NamedRun":
        """The run's names, checked before any work (a name that would leave ``folder`` is refused)."""
        name = save_name.strip() or name_from(config.concept)
        # the checkpoint is named by the name's stem, as the LoRA's files are: "cat.safetensors" names cat's
        return cls(folder, name, config, resume, safe_output_path(folder, name),
                   path_inside(folder / CHECKPOINTS, stem(name), CHECKPOINT_SUFFIX))

    def finished(self, backend: Backend) -> Path | None:
        """A file saved earlier under this name from exactly these settings on this very model, all steps done."""
        return finished_lora(self.config, backend.fingerprint(), backend.base_digest(),
                             saved_versions(self.folder, self.name))

    def check(self, backend: Backend, advice: str) -> None:
        """Before any work: both files can be written, and the checkpoint is one this run may continue or replace
        (``advice``: how to continue or start over, in the caller's words)."""
        check_run_files(self.lora, self.checkpoint, self.config, backend, self.resume, advice)

    @property
    def continues(self) -> Path | None:
        """The checkpoint the trainer resumes from (``ZEraseTrainer(resume_from=...)``): when asked, and one exists."""
        return self.checkpoint if self.resume and self.checkpoint.exists() else None

    def attach(self, trainer: ZEraseTrainer) -> "NamedRun":
        """Make ``trainer`` (resumed from :attr:`continues`) keep its checkpoint here, and make every checkpoint it
        saves record where its LoRA goes. Returns the run with that file: the stopped run's partial LoRA, if it is
        still there and still that run's."""
        trainer.checkpoint_path = self.checkpoint
        partial = self._partial_file(trainer)
        run = replace(self, lora=partial, replaces_partial=True) if partial else self
        # The file's whole name: read back by path_inside, which takes one ".safetensors" off a name that ends in it
        # (checkpoints that recorded the name without it read as before). Recorded without it, "cat.safetensors" as a
        # save name's file was read back as cat.safetensors' partial file: never found, the resumed run saved anew.
        trainer.checkpoint_meta[LORA_FILE] = run.lora.relative_to(self.folder.resolve()).as_posix()
        return run

    def _partial_file(self, trainer: ZEraseTrainer) -> Path | None:
        recorded = trainer.checkpoint_meta.get(LORA_FILE) if trainer.step else None
        if not recorded:
            return None
        try:
            path = path_inside(self.folder, recorded, ".safetensors")
        except ZEraseError:  # the run never writes one outside: an edited note, told as no file of this run
            return None
        return partial_lora(trainer, [path])  # missing: not it

    def save(self, lora: ErasureLoRA) -> Path:
        """Save to the name resolved before training, unless a file appeared there meanwhile (written by something
        else during a long run): then to the next free name, never over it. The partial file it continues is
        replaced. A LoRA with every step done finishes the run: its checkpoint goes, nothing is left to resume (also
        when a Cancel came with the last step, which stops the run after all its work)."""
        path = self._write(lora)
        if lora.training.get("steps_done", 0) >= self.config.steps:
            self.checkpoint.unlink(missing_ok=True)
        return path

    def _write(self, lora: ErasureLoRA) -> Path:
        if self.replaces_partial:
            return save_lora(lora, self.lora)
        if self.lora.exists():
            return save_new(lora, self.folder, self.name)
        return save_lora(lora, self.lora, exclusive=True)
