"""Backend for diffusers' ``ZImageTransformer2DModel`` (also the toy model, which is one).

Facts this relies on (diffusers 0.42, checked by running it): each main-layer sequence is
[image | caption], each segment padded to a multiple of 32, the batch padded to its
longest sample; ``to_q``/``to_k``/``to_v`` are separate Linears; the raw output predicts
x0 − ε with the model's time t = 1 − σ.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

import diffusers.models.transformers.transformer_z_image as z_image_module
# Both segments are padded to the host's own multiple (32): read it from diffusers, do not restate it.
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF as SEQ_MULTIPLE

from ..attention_mass import Recorder, checkpointed, sdpa
from ..errors import ZEraseError
from ..gate import TokenGate
from ..layout import TokenLayout, pad_to_multiple
from ..lora import GatedLoRALinear, LoRAConfig
from ..out_of_memory import empty_cache
from ..prompts import EncodedPrompt, PromptEncoder
from ..replay_checkpoint import replayed_checkpoint
from ..scoped import scoped
from .base import Backend, HostSlot, InPlaceInstaller, LoRASet
from .row_sharing import RowGroups, SharedRowsForward


@dataclass(frozen=True)
class LatentSpec:
    """How pixels map to the transformer's latent: channels and spatial downsampling."""

    channels: int = 16  # Z-Image's Flux-style VAE
    downsample: int = 8


class _AttentionCall:
    """Stands in for diffusers' ``dispatch_attention_fn`` inside one main layer's processor.

    Swapping the one function the stock processor calls keeps diffusers' projection/norm/RoPE
    code the only copy and costs nothing per op (a torch-function mode watching for SDPA would
    see every op of the layer). It runs torch's SDPA itself, so it works whatever attention
    backend diffusers is set to, hands the call to a recorder (which measures attention mass on
    the way), and, for the paper's token-zeroing baseline (§3), zeroes chosen attention columns.
    """

    def __init__(self, recorder: Recorder | None, layer: int, blocked: torch.Tensor | None = None):
        self.recorder, self.layer, self.blocked = recorder, layer, blocked

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None) -> torch.Tensor:
        if dropout_p or is_causal or enable_gqa or attention_kwargs:
            raise NotImplementedError("Z-Image's processor asks for plain attention; this call asks for more")
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # diffusers (B, L, H, D) -> SDPA's (B, H, L, D)
        if self.blocked is not None:  # §3: A_attn[:, :, idx] = 0 after the softmax, the other columns' weights as
            # they were (not renormalised): the same as those keys' values at zero, which fused kernels can run
            v = v.masked_fill(self.blocked.to(v.device)[:, None, :, None], 0)  # (B, 1, L, 1) over (B, H, L, D)
        if self.recorder is not None and self.recorder.wants(self.layer):
            out = self.recorder.attend(self.layer, sdpa, q, k, v, scale, attn_mask)
        else:
            out = sdpa(q, k, v, scale, attn_mask)
        return out.transpose(1, 2)


class _WatchedProcessor:
    """Wraps a main layer's stock processor; records attention mass while a recorder is set."""

    def __init__(self, inner: Any, layer: int, backend: "DiffusersZImageBackend"):
        self.inner, self.layer, self.backend = inner, layer, backend

    def __getattr__(self, name):  # _attention_backend etc. stay the stock processor's
        if name in ("inner", "layer", "backend"):  # not set yet: copy and pickle make the object empty first, and
            raise AttributeError(name)  # looking them up here again recursed without end (no deepcopy, no torch.save)
        return getattr(self.inner, name)

    def __setattr__(self, name, value):  # and are set there (set_attention_backend sets them on every processor)
        if name in ("inner", "layer", "backend"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    # Explicit parameters: diffusers' Attention drops keyword arguments a processor's
    # signature does not name (freqs_cis would silently vanish with **kwargs).
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        recorder, blocked = self.backend._recorder, self.backend._blocked
        if blocked is None and (recorder is None or not recorder.wants(self.layer)):
            return self.inner(*args)
        # The stock processor runs with the module's attention function swapped for this one call: its own code, not
        # a copy, computes q, k, v and RoPE. The swap is the process's for that call, so a second diffusers Z-Image
        # running in another thread meanwhile would pass through it; this engine runs one model call at a time.
        with scoped(z_image_module, dispatch_attention_fn=_AttentionCall(recorder, self.layer, blocked)):
            return self.inner(*args)


def unified_layout(image_tokens: Sequence[int], caption_tokens: Sequence[int]) -> TokenLayout:
    """[image | caption] per sample, each padded to 32, the batch to its longest sample (diffusers'
    _build_unified_sequence)."""
    image = tuple((0, pad_to_multiple(n, SEQ_MULTIPLE)) for n in image_tokens)
    text = tuple((end, end + pad_to_multiple(n, SEQ_MULTIPLE)) for (_, end), n in zip(image, caption_tokens))
    return TokenLayout.of(max(end for _, end in text), text, image, tuple(image_tokens))


LAYER_BY_LAYER_OFFLOAD = (
    "An erasure LoRA does not run on a transformer offloaded layer by layer (diffusers' enable_sequential_cpu_offload, "
    "accelerate's cpu_offload: its weights wait on the meta device): the gated layers would compute another model "
    "without an error. Use pipe.enable_model_cpu_offload() instead (the whole transformer moves to the GPU for its "
    "calls; tested), or move the pipeline to the GPU.")


def offloaded_layer_by_layer(transformer: nn.Module) -> bool:
    """Whether accelerate keeps ``transformer``'s weights on the meta device until each layer runs. The first main
    layer's tell, also inside a call: the root's own parameters are brought in for the whole call, a layer's only
    while it runs."""
    return any(p.device.type == "meta" for p in transformer.layers[0].parameters())


class _LaidOutCalls:
    """The transformer's forward, so that calls the engine does not make (a ``ZImagePipeline``'s) run the gated LoRA:
    their token layout is read off the call's own latents and caption features, laid out as diffusers lays them out.
    The engine's own calls set theirs (``_run``) and pass through. A plain callable patched onto the transformer."""

    def __init__(self, inner: Callable[..., Any], backend: "DiffusersZImageBackend"):
        self.inner, self.backend = inner, backend

    @classmethod
    def around(cls, forward: Callable[..., Any], backend: "DiffusersZImageBackend") -> "_LaidOutCalls":
        """Wrap the transformer's forward; an earlier backend's wrapper is replaced, not nested."""
        return cls(forward.inner if isinstance(forward, cls) else forward, backend)

    def __call__(self, x, t, cap_feats, *args, **kwargs):
        gate = self.backend.gate
        if gate.layout is not None:  # the engine's own call, laid out by the backend
            return self.inner(x, t, cap_feats, *args, **kwargs)
        if self.backend.holds_lora and offloaded_layer_by_layer(self.backend.transformer):  # offloaded after it
            raise ZEraseError(LAYER_BY_LAYER_OFFLOAD)
        if isinstance(x[0], list):
            raise ZEraseError("Z-Image's omni mode (reference images in the call) is not supported with an erasure "
                              "LoRA: its gate knows the token layout of a text-to-image call (one caption, one image).")
        patch, frames = kwargs.get("patch_size", 2), kwargs.get("f_patch_size", 1)  # the forward's own defaults
        images = [(s.shape[-3] // frames) * (s.shape[-2] // patch) * (s.shape[-1] // patch) for s in x]
        with gate.active(unified_layout(images, [c.shape[0] for c in cap_feats])):
            return self.inner(x, t, cap_feats, *args, **kwargs)


def owner(transformer: nn.Module) -> "DiffusersZImageBackend | None":
    """The backend that took ``transformer`` over last (its calls report to that one), or None."""
    forward = transformer.__dict__.get("forward")
    return forward.backend if isinstance(forward, _LaidOutCalls) else None


def zimage_forward(transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, captions: list[torch.Tensor],
                   **kwargs) -> torch.Tensor:
    """diffusers' Z-Image on (N, C, h, w) latents at noise levels σ (N,): its raw output, x0 − ε, as (N, C, h, w).

    It takes latents as a list of (C, F=1, h, w) and the time t = 1 − σ (0 noise → 1 clean), in fp32 as the
    pipeline passes it (in bf16, t·1000 would round by up to 1).
    """
    t = (1.0 - sigma).to(x.device, torch.float32)
    out = transformer(list(x.unsqueeze(2).unbind(0)), t, captions, return_dict=False, **kwargs)[0]
    return torch.stack(out).squeeze(2)


def check_on_grid(height: int, width: int, step: int) -> None:
    """A picture size the model's tokens tile: each side a multiple of ``step``, its pixels per token (the VAE's
    downsampling × the patch); told before loading from a folder's configs, and by a loaded model."""
    if height % step or width % step:
        raise ZEraseError(f"The size must be a multiple of {step} for this Z-Image (its pixels per token); got "
                          f"{height}×{width}.")


FINGERPRINT_SIZES = ("dim", "n_layers", "n_heads", "cap_feat_dim")  # what a LoRA file records of the model


def zimage_fingerprint(config: Any, family: str = "z-image") -> dict[str, Any]:
    """The architecture facts an erasure LoRA records and is checked against, read off a transformer config: the
    loaded model's, or its folder's config.json before the minutes of loading (a size it leaves out is not compared)."""
    return {"family": family, **{k: int(config[k]) for k in FINGERPRINT_SIZES if k in config}}


class DiffusersZImageBackend(Backend):
    """Engine view of a ``ZImageTransformer2DModel`` plus a prompt encoder."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        encoder: PromptEncoder,
        latent: LatentSpec = LatentSpec(),
        family: str = "z-image",
        device: torch.device | str | None = None,
        flow_shift: float | None = None,
        digest: str | None = None,
    ):
        if not isinstance(transformer, z_image_module.ZImageTransformer2DModel):
            raise ZEraseError(
                f"Expected diffusers' ZImageTransformer2DModel, got {type(transformer).__name__}. "
                "Z-Erase needs a single-stream Z-Image transformer."
            )
        self.transformer = transformer.requires_grad_(False)
        # Checkpointing switched on by an earlier backend over this transformer would call that backend's _checkpoint.
        self._checkpoint_first(0)  # the main layers _checkpoint recomputes: none
        self.encoder, self.latent, self.family, self.flow_shift = encoder, latent, family, flow_shift
        self._digest = digest  # of the weights it was loaded from (diffusers_loader.folder_digest); None: built here
        # Where the transformer is to run, when not where it is: a loader leaves it on the CPU while the text encoder
        # has the GPU to encode the prompts (12.3 + 8 GB in bf16 at once would not fit a 16 GB card). It moves at
        # the first use after that; from then on the backend follows the transformer.
        self._move_to = torch.device(device) if device is not None else None
        self.gate = TokenGate()
        self.patch = transformer.config.all_patch_size[0]
        self._installer = InPlaceInstaller(transformer, self.gate)
        self._recorder: Recorder | None = None
        self._blocked: torch.Tensor | None = None  # (B, L) attention columns zeroed (§3 baseline)
        self._row_groups: RowGroups | None = None  # rows of the running call with equal (x_t, σ); set per call
        self._zeroing: Callable[[Sequence[EncodedPrompt]], list[list[int]]] | None = None
        self._take_over(transformer)

    def _take_over(self, transformer: torch.nn.Module) -> None:
        """The newest backend over a transformer owns it: its attention processors, noise refiners and gated layers
        report to this one (an earlier backend's wrappers are re-pointed, not stacked)."""
        for i, layer in enumerate(transformer.layers):
            processor = layer.attention.processor
            if isinstance(processor, _WatchedProcessor):
                processor.backend = self
            else:
                layer.attention.set_processor(_WatchedProcessor(processor, i, self))
        for layer in transformer.noise_refiner:
            layer.forward = SharedRowsForward.around(layer.forward, self._current_row_groups)
        transformer.forward = _LaidOutCalls.around(transformer.forward, self)
        for path, module in transformer.named_modules():
            if isinstance(module, GatedLoRALinear):
                module.gate = self.gate
                self._installer.originals[path] = module.base_layer  # so uninstall() restores it

    # --- facts ---------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.transformer.layers)

    @property
    def device(self) -> torch.device:
        return self._move_to or self.transformer.x_pad_token.device

    def _place(self) -> None:
        """The transformer (and any LoRA on it) onto the device it was loaded for, once."""
        if self._move_to is not None:
            self.transformer.to(self._move_to)
            self._move_to = None

    def weights(self) -> Iterator[torch.Tensor]:
        yield from self.transformer.parameters()
        yield from self.transformer.buffers()

    def base_digest(self) -> str | None:
        return self._digest

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_pad_token.dtype

    def fingerprint(self) -> dict[str, Any]:
        return zimage_fingerprint(self.transformer.config, self.family)

    def host_slots(self) -> list[HostSlot]:
        dim = self.transformer.config.dim
        return [
            HostSlot(i, f"layers.{i}.attention.to_{p}", {p: (0, dim)}, dim)
            for i in range(self.n_layers)
            for p in ("q", "k", "v")
        ]

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        step = self.latent.downsample * self.patch
        check_on_grid(height, width, step)
        # RoPE's tables hold axes_lens positions per axis; an image past them was an IndexError inside diffusers.
        most = min(self.transformer.config.axes_lens[1:]) * step
        if max(height, width) > most:
            raise ZEraseError(f"Resolution {height}×{width} is past this model's position tables: at most {most} "
                              f"pixels a side ({most // step} patches of {step}). Choose a resolution ≤ {most}.")
        return (self.latent.channels, height // self.latent.downsample, width // self.latent.downsample)

    # --- LoRA ----------------------------------------------------------------------------
    def install(self, config: LoRAConfig, name: str = "zerase", replace: bool = True) -> LoRASet:
        self._place()  # adapters are made where the weights are: there, before an optimizer holds them
        return self._installer.install(self.host_slots(), config, name, self.n_layers, replace)

    def uninstall(self) -> None:
        self._installer.uninstall()

    @property
    def holds_lora(self) -> bool:
        """Whether a gated LoRA sits on the transformer (installed, not yet uninstalled)."""
        return bool(self._installer.originals)

    def _current_row_groups(self) -> RowGroups | None:
        """What a refiner wrapped by SharedRowsForward reads while the backend's call runs."""
        return self._row_groups

    def _checkpoint_first(self, layers: int) -> None:
        # diffusers hands every block it runs with gradients to _checkpoint (refiners too), which picks these.
        self._checkpointed_blocks = set(self.transformer.layers[:layers])
        if layers:
            self.transformer.enable_gradient_checkpointing(self._checkpoint)
        else:
            self.transformer.disable_gradient_checkpointing()

    @property
    def checkpointed_layers(self) -> int:
        """Read off the transformer's own switch and the layers _checkpoint picks."""
        if not self.transformer.gradient_checkpointing:
            return 0
        return len(self._checkpointed_blocks)  # a slice of the main layers

    def _checkpoint(self, block, *args):
        """Checkpoint a chosen main layer with this call's gate layout and recorder (replay_checkpoint.py); run any
        other block as it is (the refiners keep nothing for backward: they run before any gated layer)."""
        if block not in self._checkpointed_blocks:
            return block(*args)
        layout, lora_on, recorder = self.gate.layout, self.gate.lora_on, checkpointed(self._recorder)

        @contextmanager
        def replay() -> Iterator[None]:
            with ExitStack() as stack:
                if layout is not None:
                    stack.enter_context(self.gate.active(layout, lora_on))
                stack.enter_context(scoped(self, _recorder=recorder()))
                yield

        return replayed_checkpoint(block, replay, *args)

    # --- prompts and predictions ---------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> list[EncodedPrompt]:
        if self.encoder is None:
            raise RuntimeError("The text encoder was released after the prompts were encoded; encode before that.")
        encoded = self.encoder.encode(prompts)
        # RoPE's first axis holds axes_lens[0] positions: the caption takes 1 … its padded length, the image the next.
        most = (self.transformer.config.axes_lens[0] - 2) // SEQ_MULTIPLE * SEQ_MULTIPLE
        for prompt in encoded:  # past it, an IndexError inside diffusers (the tiny model holds 224 caption tokens)
            if pad_to_multiple(prompt.n_tokens, SEQ_MULTIPLE) > most:
                raise ZEraseError(f"The prompt '{prompt.text[:60]}…' is {prompt.n_tokens} tokens; this model's "
                                  f"position tables hold {most}. Shorten it (in training: the template, the concept or "
                                  "the preservation concept).")
        return encoded

    def release_encoder(self) -> None:
        """Drop the text encoder (Qwen3 4B: ~8 GB in bf16) so training has that memory back, and put the
        transformer in its place."""
        self.encoder = None
        empty_cache(self.device)
        self._place()

    def layout(self, x: torch.Tensor, prompts: Sequence[EncodedPrompt]) -> TokenLayout:
        n_image = (x.shape[-2] // self.patch) * (x.shape[-1] // self.patch)
        return unified_layout([n_image] * len(prompts), [p.n_tokens for p in prompts])

    @contextmanager
    def zeroing_tokens(self, token_indices: Callable[[Sequence[EncodedPrompt]], list[list[int]]]) -> Iterator[None]:
        """The paper's §3 baseline: zero the concept's attention columns (after the softmax) in every main layer.

        ``token_indices`` maps each call's prompts to the caption tokens to zero (it may find
        none, e.g. for a synonym: that is exactly the baseline's brittleness).
        """
        with scoped(self, _zeroing=token_indices):
            yield

    @torch.no_grad()
    def attention_maps(self, x, sigma, prompt, columns, layers=None, lora=True) -> torch.Tensor:
        """(n_words, h, w): mean over heads and ``layers`` of the mass each image token puts on each word."""
        from ..attention_maps import WordMapRecorder

        layout, zeroed = self.layout(x[:1], [prompt]), self._zeroed([prompt])
        kept = [_outside(cols, zeroed[0]) if zeroed else cols for cols in columns]
        recorder = WordMapRecorder([layout.columns([cols], self.device) for cols in kept], layers)
        self._run(x[:1], sigma[:1], [prompt], layout, lora, recorder, zeroed)
        return recorder.image_maps(layout, x.shape[-2] // self.patch, x.shape[-1] // self.patch)

    def _zeroed(self, prompts: Sequence[EncodedPrompt]) -> list[list[int]] | None:
        """Each prompt's caption tokens the token-zeroing baseline zeroes (None: it is off)."""
        return self._zeroing(prompts) if self._zeroing is not None else None

    def _run(self, x, sigma, prompts, layout, lora, recorder, zeroed=None):
        """One transformer call under the gate, the attention watch and any token zeroing; raw output."""
        self._place()
        captions = [p.features.to(self.device, self.dtype) for p in prompts]
        blocked = layout.columns(zeroed, self.device).bool() if zeroed is not None else None
        groups = RowGroups.of(x, sigma, _refiner_tags(layout), device=self.device)
        with scoped(self, _blocked=blocked, _row_groups=groups, _recorder=recorder), self.gate.active(layout, lora):
            return zimage_forward(self.transformer, x.to(self.device, self.dtype), sigma, captions)

    def velocity(self, x, sigma, prompts, *, lora=True, concept_tokens=None, mass_layers=None):
        if x.shape[0] != len(prompts):
            raise ValueError(f"{x.shape[0]} latents but {len(prompts)} prompts")
        layout, zeroed = self.layout(x, prompts), self._zeroed(prompts)
        if concept_tokens is not None and zeroed is not None:
            concept_tokens = [_outside(c, z) for c, z in zip(concept_tokens, zeroed)]
        recorder = self._mass_recorder(layout, concept_tokens, mass_layers)
        # diffusers predicts x0 − ε; the engine's velocity is ε − x0, hence the minus.
        v = -self._run(x, sigma, prompts, layout, lora, recorder, zeroed).float()
        return v, (recorder.result() if recorder is not None else None)


def _outside(columns: list[int], zeroed: list[int]) -> list[int]:
    """The measured columns the token-zeroing baseline leaves: a zeroed column holds no mass (A_attn = 0 there); the
    recorders see the softmax before it, as zeroing acts on the values."""
    return [i for i in columns if i not in zeroed]


def _refiner_tags(layout: TokenLayout) -> list[int]:
    """What the noise refiner sees of a row besides (x_t, σ): its caption's padded length. diffusers numbers the image
    tokens' positions from that length on and puts image padding at position 0, which the refiner attends to: where
    the image is padded (its tokens not a multiple of 32: 576², 832²) rows whose captions pad to other lengths differ
    (the empty prompt's v by up to 0.16 of a mean |v| of 0.46 beside a 43-token prompt on the tiny model at 64²);
    elsewhere RoPE cancels the offset exactly, but bf16 rounds the rotated q and k (7.8e-3 at most, tiny model)."""
    return [end - start for start, end in layout.text]
