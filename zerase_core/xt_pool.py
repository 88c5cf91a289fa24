"""Where x_t comes from: a pool of trajectories sampled once from the frozen model.

ESD-style training (paper §4.1) reaches x_t by sampling from noise with the erase prompt
through the frozen model, every step: on average (K − 1)/2 extra forwards per step for a
K-step sampler, all of whose results depend only on θ, never on the LoRA. The pool does
that work once. It samples ``T`` trajectories (one erase prompt each, cycling through the
prompt pool; one preservation prompt each, drawn from D_pr) and keeps every level
k = 0 … K − 1 of each. The frozen teacher's predictions at those points — v_θ(x_t, c_er),
v_θ(x_t, ∅) and v_θ(x_t, c_pr) for the trajectory's preservation prompt — are computed in
the same batched no-grad forwards that advance the sampler (the sampler needs v_θ(x_t, c_er)
anyway), so a training step that draws from the pool runs no teacher forward at all.

Everything here is deterministic given the seed, so a resumed run rebuilds the same pool.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import psutil
import torch

from . import memory_fit
from .backends.base import Backend
from .errors import ZEraseError
from .out_of_memory import empty_cache, release, told_as_out_of_memory
from .prompts import EncodedPrompt
from .sampling import guide, integrate

log = logging.getLogger(__name__)


def pool_bytes(trajectories: int, levels: int, predictions: int, latent_shape: Sequence[int]) -> int:
    """System memory a pool takes while it is sampled: each trajectory's starting noise, and x_t and the teacher's
    ``predictions`` at each of its ``levels`` (fp32, on the CPU whatever the device: the GPU holds only a batch)."""
    return trajectories * (1 + levels * (1 + predictions)) * math.prod(latent_shape) * torch.float32.itemsize


def check_host_memory(trajectories: int, least: int, levels: int, predictions: int,
                      latent_shape: Sequence[int]) -> None:
    """Refuse, before allocating it, a pool that the memory and swap free cannot hold: past them the allocation fails
    with a traceback, or, on Linux, the process filling the pool is killed (ComfyUI's server with it). A pool that
    fits only with swap is allowed with a warning: it pages, slowly. (What psutil counts as available differs: Linux's
    MemAvailable; macOS's free and inactive pages, short of what compression frees; Windows's physical memory.)"""
    needed = pool_bytes(trajectories, levels, predictions, latent_shape)
    available, swap = psutil.virtual_memory().available, psutil.swap_memory().free
    if memory_fit.fits(needed, available):
        return
    if memory_fit.fits(needed, available + swap):
        log.warning("The x_t pool needs %.1f GiB and %.1f GiB of memory are free: it will use swap, and sampling it "
                    "will be slow. Fewer trajectories or a lower resolution keep it in memory.", needed / 2**30,
                    available / 2**30)
        return
    per_trajectory = pool_bytes(1, levels, predictions, latent_shape)
    most = int((available + swap) / memory_fit.MARGIN // per_trajectory)
    fewer = f"at most {most} trajectories (TrainConfig.xt_pool, --xt-pool), " if most >= least else ""
    raise ZEraseError(f"The x_t pool of {trajectories} trajectories × {levels} levels needs {needed / 2**30:.1f} GiB "
                      f"of system memory at this resolution, and {(available + swap) / 2**30:.1f} GiB of memory and "
                      f"swap are free. Choose {fewer}a lower resolution, or xt_source 'fresh', which keeps no pool.")


class PoolCancelled(Exception):
    """``should_stop`` said stop while the pool was being sampled: nothing has been trained yet."""


@dataclass(frozen=True)
class PoolDraw:
    """One training point: x_t (1, C, H, W), σ (1,), the prompts it belongs to and the teacher there."""

    erase_index: int
    keep_index: int | None
    x_t: torch.Tensor
    sigma: torch.Tensor
    teacher: torch.Tensor  # (2 or 3, C, H, W): v_θ(x_t, c_er), v_θ(x_t, ∅)[, v_θ(x_t, c_pr) of its one c_pr]


class TrajectoryPool:
    """``x[j, k]`` is trajectory j at σ_k; ``teacher[j, k]`` the frozen predictions there."""

    def __init__(
        self,
        backend: Backend,
        erase: Sequence[EncodedPrompt],
        uncond: EncodedPrompt,
        keep: Sequence[EncodedPrompt],
        latent_shape: tuple[int, int, int],
        sigmas: torch.Tensor,
        trajectories: int,
        cfg: float,
        seed: int,
        batch: int = 8,
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ):
        start = time.perf_counter()
        self.sigmas = sigmas
        n = max(trajectories, len(erase))  # every erase prompt gets at least one trajectory
        levels, predictions = len(sigmas) - 1, 2 + (1 if keep else 0)
        check_host_memory(n, len(erase), levels, predictions, latent_shape)
        rng = random.Random(seed)
        self.erase_index = [j % len(erase) for j in range(n)]
        # c_pr ~ D_pr per trajectory, as Algorithm 1 samples it per step: a pool carries at most T of them
        self.keep_index = [rng.randrange(len(keep)) if keep else None for _ in range(n)]
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, *latent_shape), generator=gen)  # (T, C, H, W)
        self.x = torch.empty((n, levels, *latent_shape))  # (T, K, C, H, W), CPU fp32
        self.teacher = torch.empty((n, levels, predictions, *latent_shape))  # (T, K, P, C, H, W)
        self._sample_in_batches(backend, noise, erase, uncond, keep, cfg, batch, should_stop, progress)
        self.seconds = time.perf_counter() - start
        log.info("x_t pool: %d trajectories × %d levels sampled in %.1f s", n, levels, self.seconds)

    def _sample_in_batches(self, backend, noise, erase, uncond, keep, cfg, batch, should_stop, progress) -> None:
        """Fill the pool ``batch`` trajectories at a time, halving the batch whenever the device runs out;
        ``progress(done, total)`` after each batch (a bar that would otherwise stand still for minutes)."""
        n, first = noise.shape[0], 0
        while first < n:
            if should_stop is not None and should_stop():  # sampling the pool takes a while: let Cancel in
                raise PoolCancelled(f"cancelled while sampling the x_t pool ({first} of {n} trajectories)")
            rows = range(first, min(first + batch, n))
            er = [erase[self.erase_index[j]] for j in rows]
            kp = [keep[self.keep_index[j]] for j in rows] if keep else []
            if self._sampled(backend, noise[first : rows.stop].clone(), er, uncond, kp, cfg, rows):
                first = rows.stop
                if progress is not None:
                    progress(first, n)
            elif batch > 1:
                # batch × (2 or 3) rows in one no-grad forward: at 1024² gigabytes of activations beside the
                # weights. Trajectories are independent: smaller batches give the same pool (up to the GPU's
                # batch-dependent rounding).
                batch //= 2
                log.warning("x_t pool: out of memory; sampling %d trajectories at a time", batch)
                empty_cache(backend.device)  # here, not in the except: its traceback held the failed batch
            else:
                raise torch.OutOfMemoryError("x_t pool: out of memory sampling one trajectory at a time")

    def _sampled(self, *args) -> bool:
        """:meth:`_trajectories`; False if the device ran out of memory (the batch is retried smaller)."""
        try:
            with told_as_out_of_memory():
                self._trajectories(*args)
            return True
        except torch.OutOfMemoryError as err:
            release(err)  # the failed batch's activations, before a smaller batch is tried
            return False

    @torch.no_grad()
    def _trajectories(self, backend, x, er, uncond, keep, cfg, rows) -> None:
        """Euler from σ_0 = 1 down the schedule; one batched forward per level gives every prediction."""
        b = x.shape[0]
        prompts = [*er, *([uncond] * b), *keep]  # (b erase | b uncond | b keep)
        n_p = len(prompts) // b
        sigmas = self.sigmas.tolist()
        level = {s: k for k, s in enumerate(sigmas[:-1])}  # σ strictly falls (TrainConfig refuses a shift where not)

        def velocity(x: torch.Tensor, s: float) -> torch.Tensor:
            k = level[s]
            v, _ = backend.velocity(x.repeat(n_p, 1, 1, 1), torch.full((b * n_p,), s), prompts, lora=False)
            v = v.cpu().unflatten(0, (n_p, b))  # (P, b, C, H, W)
            self.x[rows.start : rows.stop, k] = x
            self.teacher[rows.start : rows.stop, k] = v.transpose(0, 1)
            return v[0] if cfg == 1.0 else guide(v[0], v[1], cfg)  # the sampler of sampling.euler

        integrate(velocity, x, sigmas)

    @property
    def trajectories(self) -> int:
        return self.x.shape[0]

    def draw(self, rng: random.Random, gen: torch.Generator, device: torch.device) -> PoolDraw:
        """A uniformly random (trajectory, level), as fresh sampling picks a random level."""
        j = rng.randrange(self.trajectories)
        k = int(torch.randint(0, self.x.shape[1], (1,), generator=gen))
        return PoolDraw(
            self.erase_index[j],
            self.keep_index[j],
            self.x[j, k : k + 1].to(device),
            self.sigmas[k].reshape(1),
            self.teacher[j, k].to(device),  # once here, not at every use in the step
        )
