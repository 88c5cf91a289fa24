"""A Z-Erase step done the way the official code does it: the benchmark's reference.

Written from the paper's description and the two backends' token layouts (not from the official source), on
the same backend, LoRA, optimizer and λ rule as :class:`~zerase_core.trainer.ZEraseTrainer`,
so that only the way the work is organised differs:

* x_t is re-sampled from noise through the sampler with the erase prompt every step;
* one forward per prediction: three teacher forwards (c_er, ∅, c_pr) and three student
  forwards, each of batch 1;
* the attention loss reads full softmax maps (B, H, L, L) per layer, kept for backward;
* L_er + λ L_pr is back-propagated every step, also while λ = 0.

It computes the same losses as the trainer on the same inputs (tests check this), which is
what makes its seconds per step a fair yardstick.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from ..attention_mass import MassRecorder, softmax_scale
from ..objectives import loss_attn, loss_er, loss_erase, loss_pr
from ..scoped import scoped

if TYPE_CHECKING:
    from ..trainer import ZEraseTrainer


class MaterialisedMassRecorder(MassRecorder):
    """Attention mass read off the full softmax map, as the official code does."""

    def attend(self, layer: int, attention, q, k, v, scale=None, attn_mask=None) -> torch.Tensor:
        scores = (q @ k.transpose(-1, -2)) * softmax_scale(scale, q)  # (B, H, L, L)
        if attn_mask is not None:
            bool_mask = attn_mask.dtype == torch.bool
            scores = scores.masked_fill(~attn_mask, float("-inf")) if bool_mask else scores + attn_mask
        probs = scores.softmax(dim=-1)  # the materialised map
        columns = self.columns.to(q.device, probs.dtype)[:, None, None, :]  # (B, 1, 1, L)
        self.keep(layer, (probs * columns).sum(dim=-1).float().mean(dim=1))
        return attention(q, k, v, scale, attn_mask)  # output: the host's kernel


@contextmanager
def materialised_maps(backend) -> Iterator[None]:
    """Make the backend measure attention mass through full softmax maps for a while."""
    with scoped(backend, recorder_factory=MaterialisedMassRecorder):
        yield


def reference_losses(trainer: "ZEraseTrainer", er, tokens, keep, x_t, sigma):
    """L_erase, L_attn, L_pr at x_t, one forward per prediction, maps materialised."""
    backend, cfg, uncond = trainer.backend, trainer.config, trainer.prompts.uncond
    with torch.no_grad():
        t_er, _ = backend.velocity(x_t, sigma, [er], lora=False)
        t_u, _ = backend.velocity(x_t, sigma, [uncond], lora=False)
        t_k = backend.velocity(x_t, sigma, [keep], lora=False)[0] if keep else None
    want_mass = cfg.attn_weight > 0
    with materialised_maps(backend):
        s_er, mass = backend.velocity(
            x_t, sigma, [er], lora=True, concept_tokens=[tokens] if want_mass else None,
            mass_layers=trainer.mass_layers,
        )
    s_u, _ = backend.velocity(x_t, sigma, [uncond], lora=True)
    s_k = backend.velocity(x_t, sigma, [keep], lora=True)[0] if keep else None
    l_erase = loss_erase(s_er, t_u, t_er, cfg.eta)
    l_attn = loss_attn(mass) if want_mass else l_erase.new_zeros(())
    return l_erase, l_attn, loss_pr(s_u, t_u, s_k, t_k)


def reference_step(trainer: "ZEraseTrainer") -> dict[str, float]:
    """One official-style Z-Erase step on the trainer's LoRA, optimizer and λ (paper rule)."""
    er, tokens, keep = trainer.prompts.draw(trainer.rng)
    x_t, sigma = trainer.sample_xt(er)  # re-sampled through the sampler every step
    l_erase, l_attn, l_pr = reference_losses(trainer, er, tokens, keep, x_t, sigma)
    lam = trainer.lambda_rule.update(l_pr.item())
    # The whole objective goes backward every step, whatever λ is.
    (loss_er(l_erase, l_attn, trainer.config.attn_weight) + lam * l_pr).backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"erase": l_erase.item(), "attn": l_attn.item(), "pr": l_pr.item(), "lam": lam}
