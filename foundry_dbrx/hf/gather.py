"""Full weights of a (possibly FSDP-sharded) training model, for ``dbrx_hf_checkpointer``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from foundry_dbrx.hf.keys import COMPOSER_MODEL_PREFIX, clean_names, strip_wrappers

__all__ = ['unwrap_ddp', 'gather_full_state_dict']


def unwrap_ddp(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def gather_full_state_dict(composer_model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The full, unsharded weights of a ``ComposerDbrxCausalLM`` (anything holding the net as ``.model``), HF key
    names, on CPU, on rank 0; None on other ranks.

    Every rank must call it: under FSDP the gather is a collective. FSDP1 (Composer's FSDP) gathers through
    ``FSDP.state_dict_type(FULL_STATE_DICT, rank0_only)``; FSDP2 / DTensor parameters through ``full_tensor()``;
    a plain or DDP model is copied as it is. Rank 0 holds the whole model in CPU memory, as LLM Foundry's
    ``hf_checkpointer`` does.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    model = unwrap_ddp(composer_model)
    if any(isinstance(m, FSDP) for m in model.modules()):
        # Offload to CPU only from an accelerator: with CPU parameters torch 2.7's offload path crashes (seen on
        # gloo), and there is nothing to offload anyway.
        on_cpu = all(p.device.type == 'cpu' for p in model.parameters())
        cfg = FullStateDictConfig(offload_to_cpu=not on_cpu, rank0_only=True)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
            state_dict = model.state_dict()
    else:
        from torch.distributed.tensor import DTensor
        state_dict = {}
        for key, value in model.state_dict().items():
            if isinstance(value, DTensor):
                value = value.full_tensor()  # collective: every rank runs it, in the same key order
            state_dict[key] = value
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    names = clean_names(state_dict, 'the training model',
                        clean=lambda k: strip_wrappers(k).removeprefix(COMPOSER_MODEL_PREFIX))
    # Clone to CPU: the export must not alias live parameters that the next optimizer step changes.
    return {name: state_dict[k].detach().to('cpu', copy=True) for name, k in names.items()}
