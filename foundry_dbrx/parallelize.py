"""How Composer shards, checkpoints and initialises a DbrxForCausalLM: applied from outside the model code.

Composer's FSDP reads three hooks off the wrapped module (``fsdp_wrap_fn``, ``activation_checkpointing_fn``,
``param_init_fn``); :func:`attach_composer_hooks` sets them on one model instance. The plan: one FSDP unit and
one activation-checkpointing unit per transformer block; the embedding, final norm and head stay in the root.
"""

from __future__ import annotations

from torch import nn

from foundry_dbrx.model import DbrxBlock, DbrxForCausalLM

__all__ = ['attach_composer_hooks', 'is_block']


def is_block(module: nn.Module) -> bool:
    return isinstance(module, DbrxBlock)


def attach_composer_hooks(model: DbrxForCausalLM) -> DbrxForCausalLM:
    """Sets Composer's FSDP hooks on ``model`` (instance attributes, the class stays single-device code)."""
    model.fsdp_wrap_fn = is_block
    model.activation_checkpointing_fn = is_block
    model.param_init_fn = model.init_module
    return model
