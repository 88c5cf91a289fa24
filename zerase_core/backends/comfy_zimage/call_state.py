"""What the patches on a clone read while a call runs: held apart from the backend that made them.

The clone's DIFFUSION_MODEL wrapper and object patches must not refer back to the backend, which holds the clone:
that cycle (clone → patch → backend → clone) would keep a dropped clone (under dynamic VRAM Train's whole second
copy of the model) alive until Python's next full garbage collection. So they hold this instead: the gate, the
host model's modules and the running call's layout, recorder and row groups, and nothing that holds the clone.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

from torch import nn

from ...attention_mass import Recorder, checkpointed
from ...errors import ZEraseError
from ...gate import TokenGate
from ...layout import TokenLayout
from ...scoped import scoped
from ..row_sharing import RowGroups
from .attention import recording_override
from .nextdit_layout import nextdit_layout
from .object_patches import erasure_chain


class CallState:
    """The running call's state, and the wrapper that sets it from each call's conditioning."""

    def __init__(self, node: str, host: nn.Module, gate: TokenGate):
        # host: the model the patches are built on. Not the clone's diffusion_model: ComfyUI's torch.compile
        # wrapper swaps the compiled module in there while it samples.
        self.node, self.host, self.gate = node, host, gate
        self.patch, self.multiple = int(host.patch_size), int(host.pad_tokens_multiple)
        self.layout: TokenLayout | None = None
        self.recorder: Recorder | None = None  # MassRecorder or WordMapRecorder of the running call
        self.row_groups: RowGroups | None = None  # rows of the running call with equal (x_t, σ)
        self.training = False  # inside training_session: every attention on ComfyUI's SDPA (recording_override)

    def diffusion_wrapper(self, executor, x, timesteps, context, num_tokens, attention_mask=None, **kwargs):
        """DIFFUSION_MODEL wrapper: the layout of this call, from its conditioning, into the gate."""
        if kwargs.get("ref_latents"):
            raise ZEraseError(
                f"{self.node}: erasure LoRAs do not support Z-Image reference latents (edit/omni mode)."
            )
        if executor.class_obj is not None and executor.class_obj is not self.host:
            # ModelPatcher.clone(model_override=...) (dynamic VRAM's non-dynamic delegate) copies object patches
            # that call this model's modules; rebuilt_model.rebind builds ours again on the new model's, except
            # beside another extension's forward patch: the new model would run the old one's layers.
            raise ZEraseError(
                f"{self.node}: ComfyUI rebuilt the model after the erasure LoRA was put on it (its dynamic VRAM "
                "does so for TorchCompileModel and hooked conditioning), and the LoRA cannot follow: another "
                "extension patched the forward of the model's layers, which is bound to the old model. Leave that "
                "extension's node out of this workflow, or start ComfyUI with --disable-dynamic-vram."
            )
        layout = nextdit_layout(context.shape[1], x, self.patch, self.multiple)
        options = kwargs.get("transformer_options")
        if options is not None:
            options.pop("block_index", None)  # refiners run first; only main layers set it
            if self.recorder is not None or self.training:
                inner = options.get("optimized_attention_override")
                options["optimized_attention_override"] = recording_override(inner, self.recorder_state,
                                                                             self.training)
        with scoped(self, layout=layout), self.gate.active(layout, self.gate.lora_on):
            return executor(x, timesteps, context, num_tokens, attention_mask, **kwargs)

    def recorder_state(self) -> tuple:
        return self.recorder, self.layout

    def current_row_groups(self) -> RowGroups | None:
        return self.row_groups

    def layer_state(self, layer: int) -> tuple:
        """What a main layer's forward depends on besides its arguments (see CheckpointedForward)."""
        qkv = self.host.layers[layer].attention.qkv.forward  # what runs: the patched chain, if any
        chain = [self.gate, *(lora.gate for lora in erasure_chain(qkv))]
        gates = [(g, g.layout, g.lora_on) for g in {id(g): g for g in chain}.values()]
        return gates, self.layout, checkpointed(self.recorder)

    @contextmanager
    def replaying(self, state: tuple) -> Iterator[None]:
        """Inside, the state :meth:`layer_state` took is in place again (a checkpointed layer's recomputation)."""
        gates, layout, recorder = state
        with scoped(self, layout=layout, recorder=recorder()), ExitStack() as stack:
            for gate, gate_layout, lora_on in gates:
                stack.enter_context(gate.active(gate_layout, lora_on))
            yield


def call_state_of(wrapper: Any) -> CallState | None:
    """The erasure-LoRA installation a DIFFUSION_MODEL wrapper is the call state of; None for another node's."""
    owner = getattr(wrapper, "__self__", None)
    return owner if isinstance(owner, CallState) else None
