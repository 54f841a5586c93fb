"""How a DbrxForCausalLM is parallelised: FSDP wrapping, expert parallelism, activation checkpointing and the init
function, all decided here and applied from outside the model code.

Two plans, chosen by Composer's FSDP version:

- **FSDP1** (Composer's default). Composer wraps the model itself, reading three hooks off it that
  :func:`attach_composer_hooks` sets: ``fsdp_wrap_fn`` (one FSDP unit per block; embedding, final norm and head in
  the root), ``activation_checkpointing_fn`` (what ``training.activation_checkpointing`` names) and
  ``param_init_fn`` (FSDP materialises a meta-device module and calls it). No expert parallelism.
- **FSDP2** (``FSDP_VERSION=2``; required for expert parallelism and for replication across nodes). The
  :class:`DbrxParallelize` callback applies the plan at Composer's ``Event.INIT``, which comes before Composer's own
  FSDP2 wrapping and is the first point where the precision and FSDP settings are known:

  1. a device mesh ``(replicate, shard_mod_ep, ep)`` over the world: ``replicate`` = ``data_parallel_replicate_degree``
     copies (across nodes), each sharded over ``shard = shard_mod_ep x ep`` ranks, EP groups of ``ep`` consecutive
     ranks inside a shard group (consecutive ranks share a node, so the all-to-all stays on NVLink);
  2. expert parallelism: every layer's expert weights become DTensors sharded by expert over ``ep`` (each rank holds
     ``E / ep`` experts, global shapes unchanged) and its dispatcher an all-to-all over the same ranks;
  3. ``fully_shard`` on each layer's experts over ``(replicate, shard_mod_ep)`` (the ranks that hold the same
     experts), on each block and on the root over ``(replicate, shard)`` (everyone): HSDP when ``replicate > 1``;
  4. Composer then finds everything wrapped (the hooks say so), applies activation checkpointing, materialises
     meta-device parameters with ``param_init_fn`` and checkpoints the DTensors with global shapes, so a checkpoint
     reshards to any world size and EP degree on load.

Gradients under EP: a rank's expert gradient sums the contributions of every token its EP group sent it, and the
data-parallel reduction then averages over the ``world / ep`` ranks that hold those experts; the tokens' losses are
averaged over the whole world, so the expert gradient is scaled by ``1 / ep`` on the way back (``grad_scale``),
which gives exactly the single-process gradient of the mean loss.

Initialisation is deterministic and independent of how the model is sharded: every parameter's full value comes
from a generator seeded by the run's seed and the parameter's name (:meth:`DbrxForCausalLM.init_module`), and each
rank keeps its shard of it, so one seed gives the same model on 1 GPU or 64, at any EP degree.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist
from composer.core import Algorithm, Callback, Event
from torch import nn

from foundry_dbrx.config import DbrxTrainingConfig
from foundry_dbrx.model import DbrxBlock, DbrxForCausalLM, DbrxNormAttentionNorm
from foundry_dbrx.moe.dispatch import AllToAllDispatcher
from foundry_dbrx.moe.experts import DbrxExperts

__all__ = ['attach_composer_hooks', 'is_block', 'activation_checkpointing_fn', 'fsdp_version', 'ParallelDims',
           'build_mesh', 'apply_expert_parallel', 'apply_fsdp2', 'DbrxParallelize', 'clip_grad_norm_',
           'MeshAwareGradientClipping']

log = logging.getLogger(__name__)


def is_block(module: nn.Module) -> bool:
    return isinstance(module, DbrxBlock)


def fsdp_version() -> int:
    """The FSDP that Composer will use: 2 where ``FSDP_VERSION=2`` is set (Composer 0.32 reads this variable)."""
    return 2 if os.environ.get('FSDP_VERSION', '1') == '2' else 1


def activation_checkpointing_fn(model: DbrxForCausalLM, training: DbrxTrainingConfig) -> Callable[[nn.Module], bool]:
    """Which modules activation checkpointing wraps: per block (every ``activation_checkpointing_every``-th), the
    whole block, its norms and attention, or its expert GEMMs (``experts``: the dispatch and its all-to-all stay
    outside the recomputed region, so nothing is exchanged twice).

    ``block`` in an expert-parallel block checkpoints its attention and its expert GEMMs as two regions instead:
    recomputing the whole block would replay the exchanges of its dispatch and combine in the backward (4 of the 11
    per layer and microbatch); the dispatched rows stay saved instead (about 2 x top_k copies of the
    block's input). Decided when the wrapper asks, after :func:`apply_expert_parallel` has run.
    """
    target, every = training.activation_checkpointing, training.activation_checkpointing_every

    def parts(block: DbrxBlock) -> tuple[nn.Module, ...]:
        if target == 'attention':
            return (block.norm_attn_norm,)
        if target == 'experts' or _is_expert_parallel(block):
            return (block.ffn.experts,) if target == 'experts' else (block.norm_attn_norm, block.ffn.experts)
        return (block,)

    def check(module: nn.Module) -> bool:
        if not isinstance(module, (DbrxBlock, DbrxNormAttentionNorm, DbrxExperts)):
            return False  # most modules: no scan of the blocks
        return any(module is part for i, block in enumerate(model.transformer.blocks) if i % every == 0
                   for part in parts(block))

    return check


def _is_expert_parallel(block: DbrxBlock) -> bool:
    experts = block.ffn.experts
    return experts.num_local_experts < experts.mlp.num_experts


def attach_composer_hooks(model: DbrxForCausalLM, training: Optional[DbrxTrainingConfig] = None,
                          param_init_fn: Optional[Callable[[nn.Module], None]] = None) -> DbrxForCausalLM:
    """Sets Composer's hooks on ``model`` (instance attributes, the class stays single-device code).

    ``param_init_fn`` defaults to the model's own deterministic initialiser; loading pretrained weights passes one
    that reads them instead.
    """
    training = training or model.training_config
    model.fsdp_wrap_fn = _fsdp_wrap_fn
    model.activation_checkpointing_fn = activation_checkpointing_fn(model, training)
    model.param_init_fn = param_init_fn or model.init_module
    return model


def _fsdp_wrap_fn(module: nn.Module) -> bool:
    # Under the FSDP2 plan every block is already wrapped by DbrxParallelize: FSDP2 refuses a second fully_shard.
    return is_block(module) and not getattr(module, '_foundry_dbrx_sharded', False)


# ----------------------------------------------------------------------------------------------------------------
# The FSDP2 plan
# ----------------------------------------------------------------------------------------------------------------
class ParallelDims:
    """World size split as ``replicate x shard``, with ``shard = shard_mod_ep x ep``; every rule checked."""

    def __init__(self, world: int, replicate: int, ep: int, num_experts: int):
        if world % replicate:
            raise ValueError(f'training.data_parallel_replicate_degree ({replicate}) must divide the world size '
                             f'({world})')
        shard = world // replicate
        if shard % ep:
            raise ValueError(f'training.expert_parallel_degree ({ep}) must divide the ranks of one shard group '
                             f'(world size {world} / data_parallel_replicate_degree {replicate} = {shard})')
        if num_experts % ep:
            raise ValueError(f'training.expert_parallel_degree ({ep}) must divide ffn_config.moe_num_experts '
                             f'({num_experts})')
        self.world, self.replicate, self.shard, self.ep = world, replicate, shard, ep
        self.shard_mod_ep = shard // ep

    def __repr__(self) -> str:
        return (f'world {self.world} = replicate {self.replicate} x shard {self.shard} '
                f'(shard = {self.shard_mod_ep} x ep {self.ep})')


def build_mesh(dims: ParallelDims, device_type: str):
    """The ``(replicate, shard_mod_ep, ep)`` mesh, with ``shard`` (= shard_mod_ep x ep) flattened into a name."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device_type, (dims.replicate, dims.shard_mod_ep, dims.ep),
                            mesh_dim_names=('replicate', 'shard_mod_ep', 'ep'))
    # DeviceMesh._flatten is how torch composes "shard" from two dims (torchtitan does the same); public in 2.8.
    mesh['shard_mod_ep', 'ep']._flatten('shard')
    return mesh


def _fsdp_mesh(mesh, shard_dim: str, replicate: int):
    # A replicate dim of size 1 would still turn FSDP into HSDP (an all-reduce over one rank per step): leave it out.
    return mesh['replicate', shard_dim] if replicate > 1 else mesh[shard_dim]


def apply_expert_parallel(model: DbrxForCausalLM, ep_mesh) -> None:
    """Makes every MoE layer expert-parallel over ``ep_mesh`` (1-D): expert weights become DTensors sharded by
    expert (global shapes kept, so checkpoints and exports see the whole layer), and the dispatcher an all-to-all.

    Works on materialised weights (each rank keeps its slice, no communication: every rank built the same model
    from the same seed) and on the meta device (nothing to slice; ``param_init_fn`` fills the shards later).
    """
    from torch.distributed.tensor import Shard, distribute_tensor
    ep = ep_mesh.size()
    for block in model.transformer.blocks:
        ffn = block.ffn
        experts: DbrxExperts = ffn.experts
        for name in ('w1', 'v1', 'w2'):
            full = getattr(experts.mlp, name)
            sharded = distribute_tensor(full.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(experts.mlp, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        experts.num_local_experts = ffn.cfg.moe_num_experts // ep
        experts.grad_scale = 1.0 / ep
        ffn.dispatcher = AllToAllDispatcher(ffn.cfg.moe_num_experts, ep_mesh.get_group())


def apply_fsdp2(model: DbrxForCausalLM, dense_mesh, expert_mesh, mp_policy=None,
                reshard_after_forward: bool = True) -> None:
    """``fully_shard``: each layer's experts over ``expert_mesh``, each block and the root over ``dense_mesh``."""
    from torch.distributed.fsdp import fully_shard
    kwargs = {'mp_policy': mp_policy} if mp_policy is not None else {}
    for block in model.transformer.blocks:
        fully_shard(block.ffn.experts, mesh=expert_mesh, reshard_after_forward=reshard_after_forward, **kwargs)
        fully_shard(block, mesh=dense_mesh, reshard_after_forward=reshard_after_forward, **kwargs)
        block._foundry_dbrx_sharded = True
    # The root's parameters (embedding, final norm, head) are needed again at once by backward: keep them.
    fully_shard(model, mesh=dense_mesh, reshard_after_forward=False, **kwargs)
    # Composer 0.32's FSDP2 policy wraps every direct child of the ComposerModel unless it says `_fsdp_wrap = False`
    # (composer/distributed/fsdp2_utils.py, generate_composer_model_policy); ours is already wrapped.
    model._fsdp_wrap = False


def _needs_fsdp2_plan(training: DbrxTrainingConfig) -> bool:
    return training.expert_parallel_degree > 1 or training.data_parallel_replicate_degree > 1


class DbrxParallelize(Callback):
    """Composer callback (registered as ``dbrx_parallelize``) that applies the FSDP2 plan at ``Event.INIT``.

    ``foundry-dbrx train`` adds it to every dbrx run; a YAML run by ``llmfoundry train`` lists it under
    ``callbacks: {dbrx_parallelize: {}}``. Without expert parallelism or replication it leaves the wrapping to
    Composer's own FSDP1 or FSDP2 (with the hooks of :func:`attach_composer_hooks`), and on a single process it
    applies the activation checkpointing Composer would not (below).

    Args:
        activation_checkpointing: checkpoint activations (what ``training.activation_checkpointing`` names) where
            Composer does not: with no FSDP config, which LLM Foundry drops on a single process ("FSDP is not
            applicable for single-GPU training"), taking the YAML's ``fsdp_config.activation_checkpointing`` with
            it. ``foundry-dbrx train`` passes the YAML's setting, so one GPU does the work of many.
    """

    def __init__(self, activation_checkpointing: bool = False):
        self.activation_checkpointing = activation_checkpointing

    def run_event(self, event: Event, state, logger) -> None:
        if event == Event.INIT:
            parallelize_for_composer(state)
            if self.activation_checkpointing and state.fsdp_config is None:
                apply_activation_checkpointing_without_fsdp(state.model)


def apply_activation_checkpointing_without_fsdp(composer_model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of the modules the dbrx model's ``activation_checkpointing_fn`` names
    (Composer applies it only through its FSDP config)."""
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl, CheckpointWrapper,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)
    model = getattr(composer_model, 'model', None)
    if not isinstance(model, DbrxForCausalLM) or any(isinstance(m, CheckpointWrapper) for m in model.modules()):
        return  # not ours, or already checkpointed (wrapping twice would recompute twice)
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=model.activation_checkpointing_fn)
    log.info('dbrx_parallelize: activation checkpointing (%s) without FSDP',
             model.training_config.activation_checkpointing)


def parallelize_for_composer(state) -> None:
    """Applies the FSDP2 plan to ``state.model`` (a ComposerDbrxCausalLM) if its training choices need it."""
    composer_model = state.model
    model = getattr(composer_model, 'model', None)
    if not isinstance(model, DbrxForCausalLM):
        return  # another model (mpt_dbrx_moe ...): Composer's own wrapping applies
    training = model.training_config
    if not _needs_fsdp2_plan(training):
        return
    from composer.utils.parallelism import FSDP2Config
    fsdp = state.fsdp_config
    what = (f'training.expert_parallel_degree {training.expert_parallel_degree}, '
            f'data_parallel_replicate_degree {training.data_parallel_replicate_degree}')
    if not isinstance(fsdp, FSDP2Config):
        raise ValueError(f'{what} need FSDP2: set fsdp_config in the YAML and FSDP_VERSION=2 in the environment '
                         '(foundry-dbrx train sets it)')
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = ParallelDims(world, training.data_parallel_replicate_degree, training.expert_parallel_degree,
                        model.config.ffn_config.moe_num_experts)
    device_type = 'cuda' if torch.cuda.is_available() else 'cpu'
    mesh = build_mesh(dims, device_type)
    from composer.distributed.fsdp2 import create_mixed_precision_policy
    from composer.distributed.fsdp2_utils import sync_optimizer_and_model_params
    mp_policy = create_mixed_precision_policy(state.precision, fsdp.mixed_precision)
    optimizer = state.optimizers[0] if state.optimizers else None
    sync = sync_optimizer_and_model_params(optimizer, composer_model) if optimizer is not None else None
    with sync or contextlib.nullcontext():
        if dims.ep > 1:
            apply_expert_parallel(model, mesh['ep'])
        apply_fsdp2(model, _fsdp_mesh(mesh, 'shard', dims.replicate), _fsdp_mesh(mesh, 'shard_mod_ep', dims.replicate),
                    mp_policy=mp_policy, reshard_after_forward=fsdp.reshard_after_forward)
    _replace_norm_clipping(state)
    log.info('dbrx_parallelize: %s; experts sharded over %d ranks, %d local experts per rank', dims,
             dims.replicate * dims.shard_mod_ep, model.config.ffn_config.moe_num_experts // dims.ep)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) for gradients that are DTensors on several device meshes.

    Under this plan the expert weights live on the ``(shard_mod_ep, ep)`` mesh and the rest on ``shard``; torch's
    function stacks every parameter's norm into one tensor, which DTensor refuses across meshes ("All operands in
    aten.stack.default must have the same mesh"). Here the norms are combined per mesh (one all-reduce each), then
    across meshes, and every gradient is scaled by the same coefficient with no host sync. Returns the total norm.
    """
    from torch.distributed.tensor import DTensor
    by_mesh: dict = {}
    for p in parameters:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    if not by_mesh:
        return torch.zeros(())
    squares = []
    for grads in by_mesh.values():
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2)
    total = torch.stack(squares).sum().sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grads in by_mesh.values():
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return total


class MeshAwareGradientClipping(Algorithm):
    """Composer's ``GradientClipping`` with ``clipping_type: norm``, for gradients on several device meshes (expert
    parallelism): the same threshold, at the same event, through :func:`clip_grad_norm_`."""

    def __init__(self, clipping_threshold: float):
        self.clipping_threshold = clipping_threshold

    def match(self, event: Event, state) -> bool:
        return event == Event.AFTER_TRAIN_BATCH

    def apply(self, event: Event, state, logger) -> None:
        clip_grad_norm_(state.model.parameters(), self.clipping_threshold)


def _replace_norm_clipping(state) -> None:
    """Swaps Composer's norm clipping for :class:`MeshAwareGradientClipping` (the other clipping types work per
    tensor and need nothing). Composer's engine reads ``state.algorithms`` at every event, so the swap at INIT holds
    for the whole run."""
    from composer.algorithms import GradientClipping
    algorithms = list(state.algorithms)
    for i, algorithm in enumerate(algorithms):
        if isinstance(algorithm, GradientClipping) and algorithm.clipping_type == 'norm':
            algorithms[i] = MeshAwareGradientClipping(algorithm.clipping_threshold)
            log.info('dbrx_parallelize: gradient norm clipping at %g combines the norms of every device mesh',
                     algorithm.clipping_threshold)
    state.algorithms = algorithms
