"""Backend for ComfyUI's Z-Image (``comfy.ldm.lumina.model.NextDiT`` with Z-Image modulation).

ComfyUI is imported lazily, inside functions: ``import zerase_core`` works without it.
Facts this relies on (ComfyUI v0.18.x, checked by running it; DESIGN §3):

* the main-layer sequence is [caption | image]; the caption is padded to a multiple of
  ``pad_tokens_multiple`` (32), then the image tokens are padded the same way. The blocks
  are not told the caption length, so a DIFFUSION_MODEL wrapper derives the layout from the
  conditioning of every call and hands it to the gate;
* conditionings of different lengths are never batched together (``c_crossattn`` is a
  CONDRegular), so one call has one caption length;
* each main layer's attention has one fused ``qkv`` Linear: q, k, v stacked in that order;
* ``apply_model`` returns the denoised x0, hence v = ε − x0 = (x_σ − x0)/σ;
* attention goes through ``transformer_options["optimized_attention_override"]`` when set,
  called as ``override(func, q, k, v, heads, mask, skip_reshape=True, transformer_options=...)``
  with q, k, v of shape (B, H, L, D) for NextDiT.

The LoRA is installed on a ModelPatcher *clone* as object patches on
``diffusion_model.layers.N.attention.qkv.forward``: the module itself stays in place, so
ComfyUI's own weight patches (stock LoRAs on qkv) and low-VRAM casting keep working, and
unpatching restores the original forward. Each installation has its own gate and its own
keyed wrapper, so several erasure LoRAs applied in a row add up.

Gradient checkpointing is another object patch, on ``diffusion_model.layers.N.forward``: the
layer's forward runs under ``torch.utils.checkpoint`` with the per-call state (every gate's
layout, the attention capture, the call's ``transformer_options`` as they were for that
layer) captured at forward time and replayed in the recomputation during backward.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention_maps import WordMapRecorder
from ..errors import ZEraseError
from ..gate import TokenGate
from ..layout import TokenLayout, pad_to_multiple
from ..lora import GatedLoRALinear, LoRAConfig
from ..prompts import EncodedPrompt, Span
from ..scoped import scoped
from .base import Backend, HostSlot, LoRASet
from .row_sharing import RowGroups, SharedRowsForward

log = logging.getLogger(__name__)

QKV_PATH = "diffusion_model.layers.{}.attention.qkv"
LAYER_FORWARD = "diffusion_model.layers.{}.forward"
REFINER_FORWARD = "diffusion_model.noise_refiner.{}.forward"
WRAPPER_PREFIX = "zerase"
DYNAMIC_WITH_LORAS = (
    "this MODEL carries erasure LoRAs and ComfyUI runs with dynamic VRAM, under which training needs a fresh copy "
    "of the model that cannot carry them. Train on the model before Apply Erasure LoRA (stack the LoRAs afterwards "
    "or merge them), or start ComfyUI with --disable-dynamic-vram."
)
DYNAMIC_WITHOUT_FILE = (
    "ComfyUI runs with dynamic VRAM, under which training needs a copy of the model loaded from its file again, and "
    "this MODEL has none. Load it with Load Diffusion Model, or start ComfyUI with --disable-dynamic-vram."
)
TOO_LITTLE_VRAM = (
    "Training needs the whole Z-Image on the GPU (~12 GB in bf16, ~6 GB with weight_dtype fp8_e4m3fn) plus its "
    "activations (~3 GB at 512² with gradient_checkpointing). Free VRAM (close other programs, unload models), "
    "load the model in fp8, lower the resolution, or start ComfyUI without --novram."
)


# --- recognising Z-Image --------------------------------------------------------------------
def describe_model(patcher: Any) -> str:
    """A short human name for what a MODEL input holds (for refusals)."""
    base = getattr(patcher, "model", None)
    config = getattr(base, "model_config", None)
    names = [type(config).__name__ if config is not None else None,
             type(getattr(base, "diffusion_model", None)).__name__ if base is not None else None]
    return " / ".join(n for n in names if n and n != "NoneType") or type(patcher).__name__


def check_zimage(patcher: Any, node: str = "Z-Erase") -> None:
    """Raise :class:`ZEraseError` unless ``patcher`` is a ModelPatcher holding Z-Image's NextDiT."""
    try:
        import comfy.ldm.lumina.model as lumina
        import comfy.supported_models as supported
    except ImportError as err:  # pragma: no cover - only outside ComfyUI
        raise ZEraseError(f"{node}: ComfyUI is not importable ({err}).") from err
    base = getattr(patcher, "model", None)
    dit = getattr(base, "diffusion_model", None)
    config = getattr(base, "model_config", None)
    unet = getattr(config, "unet_config", {}) or {}
    ok = (
        type(dit) is lumina.NextDiT
        and isinstance(config, supported.ZImage)
        and not isinstance(config, supported.ZImagePixelSpace)
        and unet.get("z_image_modulation", False)
        and getattr(dit, "pad_tokens_multiple", None)
    )
    if not ok:
        raise ZEraseError(
            f"{node}: this MODEL is {describe_model(patcher)}, not Z-Image. Z-Erase works only on the "
            "single-stream Z-Image DiT (e.g. z_image_turbo_bf16.safetensors loaded with Load Diffusion Model); "
            "SDXL, Flux, plain Lumina 2 and other models are not supported."
        )


# --- prompts --------------------------------------------------------------------------------
def _inner_tokenizer(clip: Any):
    """(SD tokenizer holding the HF tokenizer, chat template) of a Z-Image CLIP."""
    outer = clip.tokenizer
    inner = getattr(outer, getattr(outer, "clip", ""), None)
    template = getattr(outer, "llama_template", None)
    if inner is None or template is None or "{}" not in template:
        raise ZEraseError(
            "Z-Erase: this CLIP is not Z-Image's text encoder (Qwen3 with its chat template). Load "
            "qwen_3_4b.safetensors with Load CLIP, type 'lumina2'."
        )
    return inner, template


def token_spans(hf_tokenizer: Any, ids: list[int], text: str, start: int, end: int) -> tuple[Span, ...]:
    """Per token: its (start, end) inside ``text[start:end]`` (the user's prompt), else None.

    Character offsets come from decoding growing prefixes, which works for any tokenizer whose
    decode round-trips (byte-level BPE does); a token that ends inside a multi-byte character
    joins the next one.
    """
    spans: list[Span] = []
    done, pending = 0, 0
    for k in range(1, len(ids) + 1):
        prefix = hf_tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if prefix.endswith("\ufffd") and k < len(ids):
            pending += 1
            continue
        a, b = done, len(prefix)
        inside = a < end and b > start and b > a
        span = (max(a, start) - start, min(b, end) - start) if inside else None
        spans.extend([span] * (pending + 1))
        done, pending = b, 0
    if done != len(text):
        raise ZEraseError(
            "Z-Erase: the text encoder's tokens do not spell out the prompt (is an embedding or weight "
            "syntax in it?); remove 'embedding:' and '(word:1.2)' syntax from Z-Erase prompts."
        )
    return tuple(spans)


def encode_with_clip(clip: Any, prompts: Sequence[str]) -> list[EncodedPrompt]:
    """Encode like CLIPTextEncode, plus per feature row the character span of the user's prompt."""
    inner, template = _inner_tokenizer(clip)
    out = []
    for prompt in prompts:
        tokens = clip.tokenize(prompt)
        (cond, extra), *_ = clip.encode_from_tokens_scheduled(tokens)
        ids = [int(t[0]) for batch in tokens[inner.embedding_key] for t in batch]
        mask = extra.get("attention_mask")
        features = cond[0]
        if mask is not None and mask.shape[-1] == features.shape[0]:
            keep = mask[0].bool().to(features.device)
            features, ids = features[keep], [i for i, k in zip(ids, keep.tolist()) if k]
        text = template.format(prompt)
        begin = template.index("{}")
        spans = token_spans(inner.tokenizer, ids, text, begin, begin + len(prompt))
        if len(spans) != features.shape[0]:
            raise ZEraseError(
                f"Z-Erase: {features.shape[0]} caption features but {len(spans)} tokens for '{prompt}'."
            )
        out.append(EncodedPrompt(prompt, features.detach().float().cpu(), spans))
    return out


# --- the gated forward patch ----------------------------------------------------------------
class _PreviousForward(nn.Module):
    """Stands in for the host Linear inside :class:`GatedLoRALinear`: calls the forward that was
    in place before this installation (the stock Linear's, or an earlier erasure LoRA's)."""

    def __init__(self, host: nn.Module, previous: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "_host", host)  # not a submodule: ComfyUI owns it
        object.__setattr__(self, "_previous", previous)
        self.in_features, self.out_features = host.in_features, host.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self._host.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._previous(x)


class GatedForward:
    """The object patched onto ``qkv.forward``: a plain callable (an nn.Module there would be
    registered as a submodule instead of overriding ``forward``)."""

    def __init__(self, lora: GatedLoRALinear):
        self.lora = lora

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        adapters = self.lora.adapters
        if len(adapters):
            p = next(adapters.parameters())
            if p.device != x.device:  # keeps Parameter identity (training holds references)
                with torch.inference_mode(False):  # moved while sampling, they would become inference tensors,
                    adapters.to(x.device)  # and a LoRA trained later on top of this one could not back-propagate
        return self.lora(x)


def _gates(forward: Any) -> list[TokenGate]:
    """The gates of an erasure-LoRA chain on one qkv (this installation's and earlier ones')."""
    gates = []
    while isinstance(forward, GatedForward):
        gates.append(forward.lora.gate)
        forward = getattr(forward.lora.base_layer, "_previous", None)
    return gates


class CheckpointedForward:
    """The object patched onto a main layer's ``forward``: the previous forward under
    ``torch.utils.checkpoint`` (non-reentrant).

    The recomputation runs during backward, after the DIFFUSION_MODEL wrappers and the
    attention capture have exited, and after NextDiT has moved ``transformer_options
    ["block_index"]`` on. So the state the first run saw is taken when the layer runs and
    replayed around both runs: every gate's layout and LoRA switch, the backend's capture and
    layout, and a copy of ``transformer_options`` (the attention override in it reads
    ``block_index`` and calls back into the backend). The recomputed graph is then the first.
    """

    def __init__(self, backend: "ComfyZImageBackend", layer: int, previous: Callable[..., torch.Tensor]):
        self.backend, self.layer, self.previous = backend, layer, previous

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # sampling, teacher passes: nothing to save
            return self.previous(*args, **kwargs)
        options = kwargs.get("transformer_options")
        if options is not None:
            kwargs["transformer_options"] = dict(options)  # this layer's block_index, kept
        state = self.backend._call_state(self.layer)
        previous = self.previous

        def run(*inner_args, **inner_kwargs):
            with self.backend._replaying(state):
                return previous(*inner_args, **inner_kwargs)

        # No randomness in a Z-Image layer (no dropout): no RNG state to stash and restore per layer and call.
        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def _comfy_sdpa(mask: torch.Tensor | None):
    """ComfyUI's SDPA with an explicit scale, for the recorded layers' widened heads.

    ComfyUI's optimized attention functions take no scale (they use 1/√head size, wrong for
    widened heads), and SageAttention rejects head sizes over 128; ComfyUI's own SDPA takes
    both. ``mask`` is shaped by :func:`_sdpa_mask`.
    """
    import comfy.ops

    return lambda q, k, v, scale: comfy.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _sdpa_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A ComfyUI attention mask broadcast to (B, H, L, L) as ``attention_pytorch`` shapes it."""
    if mask is not None:
        mask = mask[None] if mask.ndim == 2 else mask
        mask = mask[:, None] if mask.ndim == 3 else mask
    return mask


def _patches(x: torch.Tensor, patch: int) -> tuple[int, int]:
    """Image tokens down and across: NextDiT pads the latent up to a multiple of the patch size."""
    return -(-x.shape[-2] // patch), -(-x.shape[-1] // patch)


def _layout(context_len: int, x: torch.Tensor, patch: int, multiple: int) -> TokenLayout:
    """[caption | image], each padded to ``multiple`` (NextDiT.patchify_and_embed)."""
    text = pad_to_multiple(context_len, multiple)
    h, w = _patches(x, patch)
    image = pad_to_multiple(h * w, multiple)
    b = x.shape[0]
    return TokenLayout(text + image, ((0, text),) * b, ((text, text + image),) * b, (h * w,) * b)


class ComfyZImageBackend(Backend):
    """Engine view of a ComfyUI Z-Image MODEL. Works on its own clone; the input is never changed."""

    @classmethod
    def for_training(cls, model: Any, clip: Any = None, node: str = "Z-Erase") -> "ComfyZImageBackend":
        """A backend to train on ``model``; under ComfyUI's dynamic VRAM (its default on NVIDIA), on its
        non-dynamic twin.

        Dynamic VRAM pages weights in per op, falls back to cast buffers that later ops reuse when VRAM runs
        short, and keeps per-op casts made while sampling (inference tensors). Backward needs every weight a
        forward saved, unchanged. ComfyUI itself turns to the non-dynamic model where a feature needs fixed
        weights (torch.compile, hooked conditioning); the twin is loaded from the model's file again for this run
        and released with it. Erasure LoRAs applied to ``model`` are bound to its modules, so they cannot move.
        """
        check_zimage(model, node)
        if not getattr(model, "is_dynamic", lambda: False)():
            return cls(model, clip, node)
        if any(isinstance(p, GatedForward) for p in model.object_patches.values()):
            raise ZEraseError(f"{node}: {DYNAMIC_WITH_LORAS}")
        if getattr(model, "cached_patcher_init", None) is None:  # built in memory: no file to load the twin from
            raise ZEraseError(f"{node}: {DYNAMIC_WITHOUT_FILE}")
        log.info("%s: training on a non-dynamic copy of the model (ComfyUI's dynamic VRAM pages weights per op)", node)
        return cls(model.clone(disable_dynamic=True), clip, node)

    def __init__(self, model: Any, clip: Any = None, node: str = "Z-Erase"):
        check_zimage(model, node)
        self.node = node
        self.patcher = model.clone()
        self.clip = clip
        self.gate = TokenGate()
        self.key = f"{WRAPPER_PREFIX}_{uuid.uuid4().hex[:12]}"
        self._wrapped: dict[int, GatedLoRALinear] = {}
        self._recorder: Any = None  # MassRecorder / WordMapRecorder of the running call
        self._layout: TokenLayout | None = None
        self._checkpointed: set[int] = set()
        # Set by training_session: every load puts the whole model on the device, with weights autograd can use.
        self._whole, self._weights_owned, self._frozen = False, False, []
        # The model the patches are built on. Not self.dit: ComfyUI's torch.compile wrapper swaps the compiled
        # module into diffusion_model while it samples, and the wrapper must not touch that property there.
        self._host = dit = self.dit
        self.patch = int(dit.patch_size)
        self.multiple = int(dit.pad_tokens_multiple)
        unet = self.patcher.model.model_config.unet_config
        self.dim = int(unet["dim"])
        self.n_heads = int(unet["n_heads"])
        self.n_kv_heads = int(unet.get("n_kv_heads") or self.n_heads)
        self.cap_feat_dim = int(unet.get("cap_feat_dim", 0))
        from comfy.patcher_extension import WrappersMP

        self.patcher.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, self.key, self._diffusion_wrapper)
        for i in range(len(self.dit.noise_refiner)):  # image tokens and t only: shareable across prompts
            key = REFINER_FORWARD.format(i)  # a wrapper inherited from the input MODEL's clone is replaced
            self.patcher.add_object_patch(
                key, SharedRowsForward.around(self.patcher.get_model_object(key), self._current_row_groups))

    # --- facts -----------------------------------------------------------------------------
    @property
    def dit(self) -> nn.Module:
        return self.patcher.model.diffusion_model

    @property
    def n_layers(self) -> int:
        return len(self.dit.layers)

    @property
    def device(self) -> torch.device:
        return torch.device(self.patcher.load_device)

    def fingerprint(self) -> dict[str, Any]:
        return {"family": "z-image", "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "cap_feat_dim": self.cap_feat_dim}

    def host_slots(self) -> list[HostSlot]:
        d = self.dim // self.n_heads
        q, kv = self.n_heads * d, self.n_kv_heads * d
        slices = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
        return [HostSlot(i, QKV_PATH.format(i), slices, self.dim) for i in range(self.n_layers)]

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        step = 8 * self.patch
        if height % step or width % step:
            raise ZEraseError(f"{self.node}: resolution {height}×{width} must be a multiple of {step}.")
        channels = int(self.patcher.model.latent_format.latent_channels)
        return (channels, height // 8, width // 8)

    # --- LoRA through object patches --------------------------------------------------------
    def _wrap(self, slot: HostSlot) -> GatedLoRALinear:
        if slot.layer in self._wrapped:
            return self._wrapped[slot.layer]
        host = self.patcher.get_model_object(slot.path)
        previous = self.patcher.get_model_object(slot.path + ".forward")
        lora = GatedLoRALinear(_PreviousForward(host, previous), slot.slices, self.gate)
        self.patcher.add_object_patch(slot.path + ".forward", GatedForward(lora))
        self._wrapped[slot.layer] = lora
        return lora

    def install(self, config: LoRAConfig, name: str = "zerase") -> LoRASet:
        lora_set = LoRASet(name, config)
        wanted = set(config.layer_indices(self.n_layers))
        for slot in self.host_slots():
            targets = tuple(t for t in config.targets if t in slot.slices)
            if slot.layer not in wanted or not targets:
                continue
            # On the compute device, not the host weight's (the CPU while ComfyUI holds the model offloaded, and
            # always under dynamic VRAM): AdamW state restored on resume lands on the parameters' device.
            adapter = self._wrap(slot).add_adapter(name, targets, config.rank, config.scale, config.strength,
                                                   device=self.device)
            for proj in targets:
                lora_set.add(slot.layer, proj, adapter)
        return lora_set

    def uninstall(self) -> None:
        for layer in self._wrapped:
            self.patcher.object_patches.pop(QKV_PATH.format(layer) + ".forward", None)
        self._wrapped.clear()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Checkpoint every main layer (object patches on this clone; refiners are not touched).

        Activations of a layer are recomputed in backward instead of kept; gradients are the
        same. Switching off, or unpatching the clone, restores the layers' own forwards.
        """
        for layer in range(self.n_layers):
            key = LAYER_FORWARD.format(layer)
            if enabled and layer not in self._checkpointed:
                previous = self.patcher.get_model_object(key)
                if isinstance(previous, CheckpointedForward):  # inherited from the input MODEL's clone
                    previous = previous.previous
                self.patcher.add_object_patch(key, CheckpointedForward(self, layer, previous))
                self._checkpointed.add(layer)
            elif not enabled and layer in self._checkpointed:
                self.patcher.object_patches.pop(key, None)
                self._checkpointed.discard(layer)

    def _call_state(self, layer: int) -> tuple:
        """What a main layer's forward depends on besides its arguments (see CheckpointedForward)."""
        qkv = self.dit.layers[layer].attention.qkv.forward  # what runs: the patched chain, if any
        gates = [(g, g.layout, g.lora_on) for g in {id(g): g for g in [self.gate, *_gates(qkv)]}.values()]
        return gates, self._layout, self._recorder

    @contextmanager
    def _replaying(self, state: tuple) -> Iterator[None]:
        gates, layout, recorder = state
        with scoped(self, _layout=layout, _recorder=recorder), ExitStack() as stack:
            for gate, gate_layout, lora_on in gates:
                stack.enter_context(gate.active(gate_layout, lora_on))
            yield

    # --- per call: layout, gate, attention capture -------------------------------------------
    def _diffusion_wrapper(self, executor, x, timesteps, context, num_tokens, attention_mask=None, **kwargs):
        """DIFFUSION_MODEL wrapper: the layout of this call, from its conditioning, into the gate."""
        if kwargs.get("ref_latents"):
            raise ZEraseError(
                f"{self.node}: erasure LoRAs do not support Z-Image reference latents (edit/omni mode)."
            )
        if executor.class_obj is not None and executor.class_obj is not self._host:
            # ModelPatcher.clone(model_override=...) (dynamic VRAM's non-dynamic delegate) copies object patches
            # that call this model's modules: the new model would run the old one's layers.
            raise ZEraseError(
                f"{self.node}: ComfyUI rebuilt the model after the erasure LoRA was put on it (its dynamic VRAM "
                "does so for TorchCompileModel and hooked conditioning), which erasure LoRAs do not follow yet. Put "
                "TorchCompileModel before Apply Erasure LoRA, or start ComfyUI with --disable-dynamic-vram."
            )
        layout = _layout(context.shape[1], x, self.patch, self.multiple)
        options = kwargs.get("transformer_options")
        if options is not None:
            options.pop("block_index", None)  # refiners run first; only main layers set it
            if self._recorder is not None:
                options["optimized_attention_override"] = self._override(options.get("optimized_attention_override"))
        with scoped(self, _layout=layout), self.gate.active(layout, self.gate.lora_on):
            return executor(x, timesteps, context, num_tokens, attention_mask, **kwargs)

    def _override(self, inner: Callable | None) -> Callable:
        """An attention override that hands main-layer attention to the recorder, else runs the stock path.

        Recorded layers (the student's erase prediction while training, the Attention Map
        Viewer) run on ComfyUI's SDPA, not on ``func`` or an earlier override (see _comfy_sdpa).
        """

        def override(func, q, k, v, heads, mask=None, **kwargs):
            run = func if inner is None else (lambda *args, **kw: inner(func, *args, **kw))
            layer = (kwargs.get("transformer_options") or {}).get("block_index")
            recorder, layout = self._recorder, self._layout
            if layer is None or recorder is None or layout is None or not recorder.wants(int(layer)):
                return run(q, k, v, heads, mask, **kwargs)
            b = q.shape[0]
            if not kwargs.get("skip_reshape", False):  # (B, L, H·D) -> (B, H, L, D)
                q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
            if q.shape[2] != layout.seq_len:
                return run(q, k, v, heads, mask, **(kwargs | {"skip_reshape": True}))
            mask4 = _sdpa_mask(mask)  # the kernel and a recorder that computes scores itself see one mask
            out = recorder.attend(int(layer), _comfy_sdpa(mask4), q, k, v, None, mask4)  # (B, H, L, D)
            if kwargs.get("skip_output_reshape", False):
                return out
            return out.transpose(1, 2).reshape(b, -1, heads * v.shape[-1])

        return override

    def recording(self, recorder: Any) -> ContextManager:
        """While inside, main layers' attention runs through ``recorder.attend`` where it ``wants`` the layer."""
        return scoped(self, _recorder=recorder)

    def lora_switched(self, on: bool) -> ContextManager:
        return scoped(self.gate, lora_on=on)

    @contextmanager
    def _caption_lengths(self, lengths: list[int]) -> Iterator[None]:
        """Let captions of different lengths that pad to the same multiple share one call, exactly.

        Alone, a caption of n tokens is embedded and then padded with ``cap_pad_token`` up to the
        multiple (positions continue through the padding). Batched, the shorter captions arrive
        zero-padded to the longest; this hook turns their embedded rows n.. into ``cap_pad_token``,
        so every row sees the sequence it would see alone.
        """
        if len(set(lengths)) == 1:
            yield
            return
        lengths_t = torch.tensor(lengths)

        def pad_rows(module, inputs, out):
            beyond = torch.arange(out.shape[1], device=out.device)[None, :] >= lengths_t.to(out.device)[:, None]
            return torch.where(beyond[..., None], self.dit.cap_pad_token.to(out), out)

        handle = self.dit.cap_embedder.register_forward_hook(pad_rows)
        try:
            yield
        finally:
            handle.remove()

    def _sharing_rows(self, x: torch.Tensor, sigma: torch.Tensor) -> ContextManager:
        """While inside, the noise refiner runs once per distinct (x, σ) row (see row_sharing)."""
        return scoped(self, _row_groups=RowGroups.of(x, sigma))

    # --- prompts and predictions ------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> list[EncodedPrompt]:
        if self.clip is None:
            raise ZEraseError(f"{self.node}: no CLIP is connected to encode prompts with.")
        encoded = encode_with_clip(self.clip, prompts)
        width = encoded[0].features.shape[-1] if encoded else self.cap_feat_dim
        if self.cap_feat_dim and width != self.cap_feat_dim:  # another LLM's chat template passes the tokenizer check
            raise ZEraseError(
                f"{self.node}: this CLIP gives {width}-wide text features, the model takes {self.cap_feat_dim} "
                "(Z-Image's Qwen3 4B). Load qwen_3_4b.safetensors with Load CLIP, type 'lumina2'."
            )
        return encoded

    def release_encoder(self) -> None:
        """Drop this backend's hold on the CLIP once the prompts are encoded (ComfyUI moves it out as memory is
        needed; the node's own input keeps it for other nodes)."""
        self.clip = None

    def load(self) -> None:
        """Load the clone (object patches and wrappers applied) onto the compute device; whole while training.

        Backward reads the weights each forward saved. A partial (low-VRAM) load casts the weights it left behind
        into cast buffers that every layer reuses, so by backward a saved weight may be another layer's: autograd
        refuses it, or, under checkpointing's recomputation, silently takes it. As ComfyUI's own LoRA trainer
        does, training therefore loads the whole model, evicting every other model (the text encoder is done by
        the first forward), and refuses where ComfyUI still loads it in part (--novram). Dynamic VRAM: see
        :meth:`for_training`.
        """
        import comfy.model_management as mm

        if not self._whole:
            mm.load_models_gpu([self.patcher])
            return
        if not self._loaded_whole():  # asked before every forward: ComfyUI's load re-applies every patch (~3 ms)
            try:
                # memory_required beyond any card: every other model leaves the GPU first (the text encoder, ~8 GB,
                # is done), so the activations and the x_t pool get the room; ComfyUI's trainer loads the same way.
                mm.load_models_gpu([self.patcher], memory_required=1e20, force_full_load=True)
            except torch.OutOfMemoryError as err:
                raise ZEraseError(f"{self.node}: {TOO_LITTLE_VRAM} ({err})") from err
            if getattr(self.patcher.model, "model_lowvram", False):
                raise ZEraseError(f"{self.node}: ComfyUI loaded the model only in part (low-VRAM mode). "
                                  f"{TOO_LITTLE_VRAM}")
            self._weights_owned = False
        if not self._weights_owned:
            self._own_weights()

    def _own_weights(self) -> None:
        """Weights autograd can use, after each load of a training session.

        ComfyUI runs nodes under ``torch.inference_mode()``, so weights loaded there are inference
        tensors, which autograd cannot save for backward. Each is replaced, one at a time, by a plain
        copy that stays (as ComfyUI's own ops do when they move such weights): the original is freed at
        once, so the weights never sit in memory twice, and nothing stale is put back over what ComfyUI
        may change meanwhile. Plain parameters (a model built outside inference mode) are frozen for the
        session and given back after it: otherwise backward would compute and keep a gradient for every
        base weight (and fail on fp8 ones).
        """
        with torch.no_grad():
            for module in self.dit.modules():
                for name, param in list(module._parameters.items()):
                    if param is not None and param.is_inference():
                        module._parameters[name] = nn.Parameter(param.clone(), requires_grad=False)
                    elif param is not None and param.requires_grad:
                        self._frozen.append(param.requires_grad_(False))
                for name, buf in list(module._buffers.items()):
                    if buf is not None and buf.is_inference():
                        module._buffers[name] = buf.clone()
        self._weights_owned = True

    def _loaded_whole(self) -> bool:
        """This clone is ComfyUI's loaded model, whole, with its weight and object patches in place."""
        import comfy.model_management as mm
        from comfy.utils import get_attr

        patcher, model = self.patcher, self.patcher.model
        return (any(m is patcher for m in mm.loaded_models()) and not model.model_lowvram
                and patcher.loaded_size() >= patcher.model_size()
                and model.current_weight_patches_uuid == patcher.patches_uuid
                and patcher.object_patches_backup.keys() == patcher.object_patches.keys()  # none applied or left over
                and all(get_attr(model, k) is v for k, v in patcher.object_patches.items()))

    def layout(self, x: torch.Tensor, prompts: Sequence[EncodedPrompt]) -> TokenLayout:
        lengths = {pad_to_multiple(p.n_tokens, self.multiple) for p in prompts}
        if len(lengths) != 1:
            raise ValueError("one ComfyUI call takes captions that pad to one length")
        return _layout(lengths.pop(), x, self.patch, self.multiple)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """x0 from ``apply_model`` for a batch sharing one padded caption length; wrappers included."""
        from comfy.patcher_extension import copy_nested_dicts, merge_nested_dicts

        model = self.patcher.model
        options = copy_nested_dicts(self.patcher.model_options.get("transformer_options", {}))
        merge_nested_dicts(options.setdefault("wrappers", {}), self.patcher.wrappers, copy_dict1=False)
        device = self.patcher.load_device
        return model.apply_model(
            x.to(device), sigma.to(device), c_crossattn=features.to(device),
            num_tokens=features.shape[1], transformer_options=options,
        )

    def velocity(self, x, sigma, prompts, *, lora=True, concept_tokens=None, mass_layers=None):
        if x.shape[0] != len(prompts):
            raise ValueError(f"{x.shape[0]} latents but {len(prompts)} prompts")
        self.load()
        # One call per padded caption length: NextDiT ignores caption masks, so only captions that
        # pad to the same length can share a call exactly (see _caption_lengths).
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(pad_to_multiple(p.n_tokens, self.multiple), []).append(i)
        v_out: list[torch.Tensor | None] = [None] * len(prompts)
        mass_out: list[torch.Tensor | None] = [None] * len(prompts)
        for _, idx in groups.items():
            xs, ss = x[idx], sigma[idx].float()
            lengths = [prompts[i].n_tokens for i in idx]
            feats = torch.nn.utils.rnn.pad_sequence([prompts[i].features for i in idx], batch_first=True)
            recorder = None
            if concept_tokens is not None:
                lay = _layout(feats.shape[1], xs, self.patch, self.multiple)
                recorder = self.recorder_factory(lay.columns([concept_tokens[i] for i in idx], self.device),
                                                 lay.image_query_mask(self.device), mass_layers)
            with self.lora_switched(lora), self._caption_lengths(lengths), self._sharing_rows(xs, ss):
                with self.recording(recorder):  # a checkpointed layer replays this group's recorder in backward
                    x0 = self.denoise(xs, ss, feats)
            s = ss.to(x0.device).view(-1, 1, 1, 1)
            v = (xs.to(x0.device).float() - x0.float()) / s  # ComfyUI returns x0; v = ε − x0 = (x_σ − x0)/σ
            group_mass = recorder.result() if recorder is not None else None
            for j, i in enumerate(idx):
                v_out[i] = v[j]
                if group_mass is not None:
                    mass_out[i] = group_mass[j]
        v_all = torch.stack(v_out)
        mass = torch.stack(mass_out) if concept_tokens is not None else None
        return v_all, mass

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, sigma: torch.Tensor, prompt: EncodedPrompt,
                       columns: list[list[int]], layers: set[int] | None = None, lora: bool = True) -> torch.Tensor:
        """(n_words, h, w): mean over heads and ``layers`` of the mass each image token puts on each word.

        ``lora`` is accepted for the engine's interface; a MODEL carries its erasure LoRAs as
        patches, so comparing erased and original means passing both MODELs.
        """
        self.load()
        feats = prompt.features[None]
        lay = _layout(feats.shape[1], x, self.patch, self.multiple)
        recorder = WordMapRecorder([lay.columns([cols]) for cols in columns], layers)
        with self.recording(recorder):
            self.denoise(x[:1], sigma[:1].float(), feats)
        if not recorder.seen:
            raise ZEraseError(f"{self.node}: no main layer in the chosen range ran (the model has {self.n_layers}).")
        return recorder.image_maps(lay, *_patches(x, self.patch))


# --- training inside a node -----------------------------------------------------------------
@contextmanager
def training_session(backend: ComfyZImageBackend) -> Iterator[None]:
    """Leave inference mode and set ComfyUI's training flag; while inside, the backend loads the model whole,
    with weights autograd can use (see ``load``). The first load comes with the first forward, after the prompts
    are encoded, so the text encoder makes room for it and the model is not loaded whole twice."""
    import comfy.model_management as mm

    with torch.inference_mode(False), scoped(backend, _whole=True, _weights_owned=False, _frozen=[]):
        mm.in_training = True
        try:
            yield
        finally:
            mm.in_training = False
            for param in backend._frozen:
                param.requires_grad_(True)
            mm.soft_empty_cache()
