"""The engine's view of a ComfyUI Z-Image MODEL (see the package docstring for the facts it relies on)."""

from __future__ import annotations

import logging
import uuid
from contextlib import contextmanager
from typing import Any, ContextManager, Iterator, Sequence

import torch
from torch import nn

from ...attention_maps import WordMapRecorder
from ...attention_mass import Recorder
from ...errors import ZEraseError
from ...gate import TokenGate
from ...layout import TokenLayout, pad_to_multiple
from ...lora import GatedLoRALinear, LoRAConfig
from ...prompts import EncodedPrompt
from ...scoped import scoped
from ..base import Backend, HostSlot, LoRASet, combined_digest, install_on
from ..row_sharing import RowGroups, SharedRowsForward, take_rows
from .call_state import CallState, call_state_of
from .clip_prompts import encode_with_clip
from .digest import model_digest, text_encoder_digest
from .loading import load_whole, loaded_whole, own_weights, training_model, uncompiled
from .nextdit_layout import image_patches, nextdit_layout
from .object_patches import (LAYER_FORWARD, OFFLOAD_KEY, QKV_PATH, REFINER_FORWARD, CheckpointedForward, GatedForward,
                             PreviousForward, offload_adapters, own_forward)
from .rebuilt_model import REBIND_KEY, rebind
from .recognise import check_zimage

WRAPPER_PREFIX = "zerase"

log = logging.getLogger(__name__)


class ComfyZImageBackend(Backend):
    """Engine view of a ComfyUI Z-Image MODEL. Works on its own clone; the input is never changed."""

    @classmethod
    def for_training(cls, model: Any, clip: Any = None, node: str = "Z-Erase") -> "ComfyZImageBackend":
        """A backend to train on ``model``: on its non-dynamic twin under dynamic VRAM (see training_model), without
        TorchCompileModel's wrapper (see uncompiled)."""
        check_zimage(model, node)
        backend = cls(training_model(model, node), clip, node)
        uncompiled(backend.patcher, node)  # on the backend's own clone: the input MODEL keeps it
        return backend

    def __init__(self, model: Any, clip: Any = None, node: str = "Z-Erase"):
        # ``node`` prefixes this backend's refusals. The nodes' told_as prefixes what fails inside a node's own call;
        # the patches' refusals (call_state.py) come later, inside a KSampler run, where only this name says which
        # node put the LoRA on the model.
        check_zimage(model, node)
        self.node = node
        self.patcher = model.clone()
        self.clip = clip
        # A run's digest takes its text encoder's (base_digest); kept when training releases the CLIP.
        self._encodes, self._released_digest = clip is not None, None
        self.gate = TokenGate()
        self.key = f"{WRAPPER_PREFIX}_{uuid.uuid4().hex[:12]}"
        self._wrapped: dict[int, GatedLoRALinear] = {}
        # Object patches our wrappers replaced (erasure LoRAs applied before), to put back at uninstall. Kept, not
        # derived from the wrapped forwards: a forward cannot tell whether it was the clone's object patch or set on
        # the module itself (which must stay out of object_patches).
        self._inherited: dict[str, Any] = {}
        # Set by training_session: every load puts the whole model on the device, with weights autograd can use.
        self._whole, self._weights_owned, self._frozen = False, False, []
        self._told_left_out = False  # denoise says once which wrappers of other nodes its calls leave out
        # What the patches read while a call runs, apart from this backend (see call_state.py).
        self.calls = CallState(node, self.dit, self.gate)
        self.patch, self.multiple = self.calls.patch, self.calls.multiple
        # An input MODEL cloned from a checkpointing backend's patcher carries its patches: this backend decides
        # (kept on a layer it does not checkpoint, the other backend's replay would run there).
        self._checkpoint_first(0)
        unet = self.patcher.model.model_config.unet_config
        self.dim = int(unet["dim"])
        self.n_heads = int(unet["n_heads"])
        self.n_kv_heads = int(unet.get("n_kv_heads") or self.n_heads)
        self.cap_feat_dim = int(unet.get("cap_feat_dim", 0))
        self._add_patches()

    def _add_patches(self) -> None:
        """The clone's own patches: the wrapper that tells the gate each call's layout, the callbacks that follow the
        model when ComfyUI rebuilds or offloads it, and the noise refiners' row sharing."""
        from comfy.patcher_extension import CallbacksMP, WrappersMP

        self.patcher.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, self.key, self.calls.diffusion_wrapper)
        # ComfyUI may put these patches onto another model object (rebuilt_model.py), and move the model off the GPU:
        # the applied LoRAs' weights go with it. Once each (a clone inherits its source's callbacks).
        for call, key, callback in ((CallbacksMP.ON_CLONE, REBIND_KEY, rebind),
                                    (CallbacksMP.ON_DETACH, OFFLOAD_KEY, offload_adapters)):
            self.patcher.remove_callbacks_with_key(call, key)
            self.patcher.add_callback_with_key(call, key, callback)
        for i in range(len(self.dit.noise_refiner)):  # image tokens and t only: shareable across prompts
            key = REFINER_FORWARD.format(i)  # a wrapper inherited from the input MODEL's clone is replaced
            self.patcher.add_object_patch(
                key, SharedRowsForward.around(self.patcher.get_model_object(key), self.calls.current_row_groups))

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

    @property
    def dtype(self) -> torch.dtype:
        return self.patcher.model.get_dtype_inference()  # the weights' dtype, or the one fp8 weights are cast to

    def fingerprint(self) -> dict[str, Any]:
        facts = {"family": "z-image", "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads}
        # the caption width where the model's config tells it (ComfyUI's detection reads it from the weights): a 0
        # would be compared as a fact, and refuse every LoRA trained elsewhere
        return facts | ({"cap_feat_dim": self.cap_feat_dim} if self.cap_feat_dim else {})

    def weights(self) -> Iterator[torch.Tensor]:
        yield from self.dit.parameters()
        yield from self.dit.buffers()

    def base_digest(self) -> str | None:
        """The MODEL's digest, and with a CLIP (training) the text encoder's in it: a LoRA is trained on that
        encoder's prompt features. None where either cannot be told (no reuse, no resume check)."""
        if not self._encodes:  # Apply: the MODEL alone
            return model_digest(self.patcher)
        text = self._released_digest if self.clip is None else text_encoder_digest(self.clip)
        return combined_digest(model_digest(self.patcher), text)

    def host_slots(self) -> list[HostSlot]:
        d = self.dim // self.n_heads
        q, kv = self.n_heads * d, self.n_kv_heads * d
        slices = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
        return [HostSlot(i, QKV_PATH.format(i), slices, self.dim) for i in range(self.n_layers)]

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        fmt = self.patcher.model.latent_format
        down = int(fmt.spacial_downscale_ratio)  # the VAE's (Z-Image's: 8)
        step = down * self.patch
        if height % step or width % step:
            raise ZEraseError(f"{self.node}: resolution {height}×{width} must be a multiple of {step}.")
        return (self.latent_channels, height // down, width // down)

    @property
    def flow_shift(self) -> float:
        """The shift of the model's σ schedule as sampling will use it (ModelSamplingAuraFlow's, when patched)."""
        return float(self.patcher.get_model_object("model_sampling").shift)

    @property
    def latent_channels(self) -> int:
        """Channels of the model's latents (Z-Image's VAE: 16)."""
        return int(self.patcher.model.latent_format.latent_channels)

    # --- LoRA through object patches --------------------------------------------------------
    def _wrap(self, slot: HostSlot) -> GatedLoRALinear:
        if slot.layer in self._wrapped:
            return self._wrapped[slot.layer]
        host = self.patcher.get_model_object(slot.path)
        key = slot.path + ".forward"
        previous = self.patcher.get_model_object(key)
        if key in self.patcher.object_patches:  # previous is an earlier LoRA's patch, not the module's forward
            self._inherited[key] = previous
        lora = GatedLoRALinear(PreviousForward(host, previous), slot.slices, self.gate)
        self.patcher.add_object_patch(key, GatedForward(lora))
        self._wrapped[slot.layer] = lora
        return lora

    def install(self, config: LoRAConfig, name: str = "zerase", replace: bool = True) -> LoRASet:
        # On the compute device, not the host weight's (the CPU while ComfyUI holds the model offloaded, and
        # always under dynamic VRAM): AdamW state restored on resume lands on the parameters' device.
        if config.scope != "text":  # the ungated ablation runs on the toy and diffusers backends only
            raise ZEraseError(f"{self.node}: in ComfyUI only gated LoRAs (scope 'text') are trained and applied; "
                              f"got scope {config.scope!r}.")
        return install_on(self.host_slots(), config, name, self.n_layers, self._wrap, device=self.device,
                          replace=replace, installed=self._wrapped.values())

    def rest(self, lora_set: LoRASet) -> None:
        """An applied LoRA waits on the offload device, as the model's weights do until a sampler loads them: made on
        the GPU at Apply, it held ~44 MB there (rank 16) outside ComfyUI's accounting until the model's first unload.
        The gated layer brings it in at the model's first call (GatedLoRALinear._follow); ON_DETACH takes it back out
        (object_patches)."""
        for adapter in set(lora_set.slots.values()):
            adapter.to(self.patcher.offload_device)

    def uninstall(self) -> None:
        """Our wrappers off this clone; the erasure LoRAs it came with stay, as they were."""
        for layer in self._wrapped:
            key = QKV_PATH.format(layer) + ".forward"
            self.patcher.object_patches.pop(key, None)
            if key in self._inherited:
                self.patcher.object_patches[key] = self._inherited.pop(key)
        self._wrapped.clear()

    def _checkpoint_first(self, layers: int) -> None:
        """Object patches on this clone (refiners are not touched); taking one away puts back what it wrapped."""
        for layer in range(self.n_layers):
            key = LAYER_FORWARD.format(layer)
            patch = self.patcher.object_patches.get(key)
            checkpointed = isinstance(patch, CheckpointedForward)
            if layer < layers and not checkpointed:
                previous = self.patcher.get_model_object(key)
                self.patcher.add_object_patch(key, CheckpointedForward(self.calls, layer, previous))
            elif layer >= layers and checkpointed:
                del self.patcher.object_patches[key]
                if not own_forward(patch.previous, self.dit.layers[layer]):  # another extension's patch
                    self.patcher.object_patches[key] = patch.previous

    @property
    def checkpointed_layers(self) -> int:
        """Read off the clone's patches, not kept beside them."""
        return sum(isinstance(self.patcher.object_patches.get(LAYER_FORWARD.format(layer)), CheckpointedForward)
                   for layer in range(self.n_layers))

    # --- per call: layout, gate, attention capture (the state lives in self.calls) ------------
    def recording(self, recorder: Recorder | None) -> ContextManager:
        """While inside, main layers' attention runs through ``recorder.attend`` where it ``wants`` the layer."""
        return scoped(self.calls, recorder=recorder)

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

        def pad_rows(module, inputs, out):
            # By slices, so nothing is copied from the host in the middle of the forward (a stall behind the GPU)
            pad = self.dit.cap_pad_token.to(out)
            return torch.stack([torch.cat([row[:n], pad.expand(out.shape[1] - n, -1)]) if n < out.shape[1] else row
                                for row, n in zip(out, lengths)])

        handle = self.dit.cap_embedder.register_forward_hook(pad_rows)
        try:
            yield
        finally:
            handle.remove()

    def _sharing_rows(self, x: torch.Tensor, sigma: torch.Tensor) -> ContextManager:
        """While inside, the noise refiner runs once per distinct (x, σ) row (see row_sharing)."""
        return scoped(self.calls, row_groups=RowGroups.of(x, sigma, device=self.patcher.load_device))

    # --- prompts and predictions ------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> list[EncodedPrompt]:
        if self.clip is None:
            raise ZEraseError(f"{self.node}: no CLIP is connected to encode prompts with.")
        encoded = encode_with_clip(self.clip, prompts, self.node)
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
        if self.clip is not None:
            self._released_digest = text_encoder_digest(self.clip)  # asked for after this (base_digest)
        self.clip = None

    def load(self) -> None:
        """Load the clone (object patches and wrappers applied) onto the compute device; while training (inside
        :func:`training_session`), whole and with weights autograd can use (see loading.load_whole)."""
        import comfy.model_management as mm

        if not self._whole:
            mm.load_models_gpu([self.patcher])
            return
        if not loaded_whole(self.patcher):  # asked before every forward: ComfyUI's load re-applies every patch
            load_whole(self.patcher, self.node)
            self._weights_owned = False
        if not self._weights_owned:
            own_weights(self.dit, self._frozen)
            self._weights_owned = True

    def weight_casts_bytes(self) -> int:
        cast = getattr(self.patcher.model, "manual_cast_dtype", None)  # set where weights are stored narrower
        if cast is None:
            return 0
        return sum(p.numel() for p in self.dit.layers.parameters()) * cast.itemsize

    def layout(self, x: torch.Tensor, prompts: Sequence[EncodedPrompt]) -> TokenLayout:
        lengths = {pad_to_multiple(p.n_tokens, self.multiple) for p in prompts}
        if len(lengths) != 1:
            raise ValueError("one ComfyUI call takes captions that pad to one length")
        return nextdit_layout(lengths.pop(), x, self.patch, self.multiple)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """x0 from ``apply_model`` for a batch sharing one padded caption length; wrappers included, but of the
        DIFFUSION_MODEL ones only the erasure LoRAs' (see _erasure_wrappers_only)."""
        from comfy.patcher_extension import copy_nested_dicts, merge_nested_dicts

        model = self.patcher.model
        options = copy_nested_dicts(self.patcher.model_options.get("transformer_options", {}))
        merge_nested_dicts(options.setdefault("wrappers", {}), self.patcher.wrappers, copy_dict1=False)
        left_out = _erasure_wrappers_only(options["wrappers"])
        if left_out and not self._told_left_out:
            log.info("%s: other nodes' model wrappers (%s) are left out of its own model calls; samplers still run "
                     "them", self.node, ", ".join(left_out))
            self._told_left_out = True
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
        device = self.patcher.load_device
        for _, idx in groups.items():
            xs, ss = take_rows(x, idx), take_rows(sigma, idx).float()
            sharing = self._sharing_rows(xs, ss)  # grouped as given: an expanded x_t by its strides, no host sync
            xs, ss = xs.to(device), ss.to(device)  # before the forward, not σ again after it (a stall behind it)
            lengths = [prompts[i].n_tokens for i in idx]
            feats = torch.nn.utils.rnn.pad_sequence([prompts[i].features for i in idx], batch_first=True)
            lay = self.layout(xs, [prompts[i] for i in idx])
            tokens = None if concept_tokens is None else [concept_tokens[i] for i in idx]
            recorder = self._mass_recorder(lay, tokens, mass_layers)
            with self.lora_switched(lora), self._caption_lengths(lengths), sharing:
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
        """See :meth:`Backend.attention_maps`; ``lora`` has no effect here (a MODEL carries its LoRAs as patches)."""
        self.load()
        feats = prompt.features[None]
        lay = self.layout(x, [prompt])
        recorder = WordMapRecorder([lay.columns([cols], self.device) for cols in columns], layers)
        with self.recording(recorder):
            self.denoise(x[:1], sigma[:1].float(), feats)
        if not recorder.seen:
            raise ZEraseError(f"{self.node}: no main layer in the chosen range ran (the model has {self.n_layers}).")
        return recorder.image_maps(lay, *image_patches(x, self.patch))


def _erasure_wrappers_only(wrappers: dict) -> list[str]:
    """Leave other nodes' DIFFUSION_MODEL wrappers out of ``wrappers`` (a call's own copy); the keys left out.

    The engine's calls are single forwards at chosen (x_t, σ) — training steps, the viewer's maps, previews — not a
    sampler's steps. ComfyUI's EasyCache wraps there: it reads the sampler's sigmas (a KeyError outside a sampler) and
    answers a step from outputs cached at earlier ones, which would stand in for the forwards training asks for."""
    from comfy.patcher_extension import WrappersMP

    found = wrappers.get(WrappersMP.DIFFUSION_MODEL, {})
    kept = {key: [w for w in each if call_state_of(w) is not None] for key, each in found.items()}
    wrappers[WrappersMP.DIFFUSION_MODEL] = {key: each for key, each in kept.items() if each}  # built anew, not
    # filtered in place: nothing of the call's copy is shared with the patcher's, whatever ComfyUI's merge copies
    return sorted(key for key, each in kept.items() if len(each) < len(found[key]))
