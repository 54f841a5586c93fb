"""``foundry-dbrx plan YAML --gpus N [--ep K]``: per-GPU memory and FLOPs of a training step, from the YAML alone.

Pure arithmetic on the config classes: no model is built, nothing touches a GPU. It prints every term in GB, the
phase of the step where memory peaks, a recommended microbatch size (the largest divisor of the per-GPU batch that
fits) and whether the YAML's own microbatch fits on the GPU (``--gpu-memory``, default an H200's 141 GB).

The model of memory (bytes per GPU; P parameters, T = microbatch * S tokens, D d_model, H heads, G KV heads,
Hd head dim, F ffn_hidden_size, E experts, K top_k, N = T*K routed slots, V vocabulary, L layers; c the compute
dtype's bytes (2 under amp_bf16), r the residual stream's (the embedding's dtype: 2 under FSDP ``PURE``, 4 when
the weights stay fp32), n = 4 the LayerNorm input's: CUDA autocast runs ``layer_norm`` in fp32, which saves an
fp32 copy of its input), with where each term comes from:

States (Composer FSDP1, ``use_orig_params``; LLM Foundry's ``decoupled_*`` optimizers):
  - fp32 master weights ``4 P / shards``, fp32 gradients ``4 P / shards`` (FSDP1 keeps the sharded ``.grad`` in
    the parameter's dtype, accumulated over microbatches), optimizer state ``8 P / shards`` for AdamW (``exp_avg``,
    ``exp_avg_sq``), ``4 P`` for Lion, ``4 P`` for SGD with momentum. shards = gpus for FULL_SHARD and
    SHARD_GRAD_OP, 1 for NO_SHARD and for one GPU.
  - On one GPU LLM Foundry drops ``fsdp_config`` (``llmfoundry/command_utils/train.py``: "FSDP is not applicable
    for single-GPU training"); the ``dbrx_parallelize`` callback still applies the YAML's activation checkpointing;
    the weights stay fp32 and autocast keeps a ``c``-byte copy of every matrix for backward (``2 P_matrices``;
    the experts' copies come from ``moe.grouped_mm.compute_dtype_cast`` and are saved by the expert function).
FSDP buffers (``mixed_precision``: PURE gathers and reduces in bf16, DEFAULT gathers bf16 and reduces fp32, FULL
fp32; p = the gathered dtype's bytes):
  - The root unit (``wte``, ``norm_f``, ``lm_head``: ``parallelize.py`` wraps only the blocks) is gathered at the
    first forward and, being the root, not resharded until backward ends: ``p P_root``; its unsharded gradient
    lives from ``lm_head``'s gradient (first in backward) to ``wte``'s (last): ``p P_root`` in backward.
  - Blocks: ``limit_all_gathers`` lets two units be gathered at a time: ``2 p P_block`` in forward; in backward the
    block being differentiated and the prefetched one, plus two unsharded block gradients (the one being computed,
    the one being reduce-scattered): ``4 p P_block``. SHARD_GRAD_OP keeps every block gathered from forward to
    backward (``p P_blocks``); NO_SHARD keeps a gathered ``p``-byte copy of everything when p < 4.
  - With ``--ep K`` (expert parallelism, torchtitan's layout): each GPU holds E/K experts, sharded by FSDP over the
    gpus/K data-parallel ranks of its expert group, so expert states per GPU are unchanged (P_experts / gpus) but a
    gathered block holds ``P_experts_block / K``; the all-to-all buffers of one layer are in flight at a time:
    dispatch and combine, each a send and a receive of ``N D c`` bytes (balanced routing): ``4 N D c``.
Activations saved for backward, per layer (measured against a CPU forward with ``saved_tensors_hooks`` in
``tests/test_plan.py``; attention as ``model.py`` computes it, SDPA's flash kernel saving q, k, v, out, lse):
  - attention: ``n T D + 8 T`` (norm_1's input, mean, rstd) + ``c T D`` (Wqkv's input) + ``c T (D + 2 G Hd)`` (the
    clamp's input) + ``c T D`` (q after RoPE) + K/V: ``2 c T D`` repeated (``gqa_impl: repeat_kv``) or, with SDPA's
    ``enable_gqa``, ``c T G Hd`` (k after RoPE) + ``c T (D + 2 G Hd)`` (v is a view of the clamped QKV, which it
    keeps) + ``c T D`` (SDPA's output, stored [B, S, H, Hd]: also out_proj's input) + ``4 T H`` (log-sum-exp) +
    ``n T D + 8 T`` (norm_2's input, mean, rstd)
  - router: ``c T D`` (its input, also the experts' input) + ``4 T E`` (fp32 softmax) + ``8 T K`` (top-k indices) +
    ``4 T K + 4 T`` (the top-k weights and their norm)
  - experts (``moe/grouped_mm.py``'s saved tensors): ``c N D`` (gathered tokens) + ``2 c N F`` (gate and up) +
    ``c N`` (routing weights) + ``16 N`` (two int64 index vectors of the routing plan) + ``4 E``
  - with activation checkpointing (non-reentrant, one per block): only each block's input, ``r T D``, is kept; the
    block being differentiated is recomputed in full, and its backward holds ``c N (2 D + F)`` of gradient buffers
    (``dy``, ``dhw``, ``dx`` gathered) besides ``2 r T D``.
  - head: ``n T D + 8 T`` (norm_f) + ``c T D`` (lm_head's input); RoPE tables ``8 S Hd`` once.
Loss (the output layer and cross entropy):
  - plain (``F.cross_entropy`` on ``logits.float()``): the ``c T V`` logits stay referenced by the model's output
    through backward; ``log_softmax`` saves its fp32 output (``4 T V``); in backward the ``nll_loss`` gradient and
    the ``log_softmax`` gradient are both fp32 ``T V`` at once: peak ``(c + 12) T V`` bytes.
  - ``fused_cross_entropy: true`` (``ops/cross_entropy.py``, chunks of C tokens, gradients in forward): the fp32
    weight-gradient accumulator ``4 V D`` and ``dh`` ``c T D`` wait for backward; a chunk holds its logits
    ``c C V`` (the Triton kernel writes their gradient over them) and, where torch has no fp32-output GEMM
    (before 2.8), the ``c V D`` product added into the accumulator.
Phases: the peak is the largest of (A) the loss in forward, (B) the start of backward (loss gradients), (C) the
backward of the first block differentiated, (D) the optimizer step (two fp32 temporaries of the largest parameter
shard: Composer's DecoupledAdamW allocates its ``denom``). "Fits" allows 5% for the caching allocator's
fragmentation and 3 GB for what it does not see (CUDA context, NCCL buffers, cuBLAS workspaces).

Communication (bytes each GPU sends per step; ring collectives move ``(S - 1) / S`` of a buffer through every member
of an S-rank group; m microbatches per step, and FSDP gathers and reduces at every one of them):
  - FSDP all-gather: forward every unit, backward every block again (FULL_SHARD reshards after forward; the root
    stays gathered), in the gathered dtype ``p``: ``(S-1)/S * p * P_dense`` over the S = gpus ranks plus, under EP
    K, ``(S_e-1)/S_e * p * P_experts / K`` over the S_e = gpus / K ranks holding the same experts (without EP the
    experts are part of P_dense);
  - FSDP reduce-scatter of the gradients, the same bytes in the reduce dtype (PURE: 2, else 4);
  - EP all-to-all, per layer: dispatch and combine in forward and again in backward, ``(K-1)/K * N D c`` each;
    activation checkpointing replays none of them (under EP, ``block`` recomputes attention and the expert GEMMs
    apart and leaves the dispatch out).

FLOPs (per GPU per step): model FLOPs ``(6 N_active + 12 L D S) * tokens`` (the MFU convention of
``ComposerDbrxCausalLM.flops_per_batch``), and executed FLOPs, which add activation checkpointing's recomputed
forward of the blocks (``2 N_active_blocks + 4 L D S`` per token).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from foundry_dbrx.config import DbrxConfig, DbrxTrainingConfig

__all__ = ['TrainSetup', 'MemoryPlan', 'setup_from_yaml', 'plan_memory', 'plan_communication', 'attention_saved_bytes',
           'router_saved_bytes', 'experts_saved_bytes', 'layer_saved_bytes', 'param_counts', 'add_arguments', 'run']

GB = 1e9
PEAK_TFLOPS = 989.0  # dense bf16, H100 SXM / H200
OPTIMIZER_STATE_BYTES = {'decoupled_adamw': 8, 'decoupled_adamw_fused': 8, 'adamw': 8, 'adam': 8,
                         'decoupled_lionw': 4, 'lion': 4, 'decoupled_sgdw': 4, 'sgd': 4}
SHARDING = ('FULL_SHARD', 'SHARD_GRAD_OP', 'NO_SHARD')
MIXED_PRECISION = ('PURE', 'DEFAULT', 'FULL')


@dataclass(kw_only=True, frozen=True)
class TrainSetup:
    """What the plan needs besides the architecture (read from a training YAML by :func:`setup_from_yaml`)."""

    gpus: int
    seq_len: int
    batch_per_gpu: int  # sequences per GPU per optimizer step
    microbatch: int
    precision: str = 'amp_bf16'  # amp_bf16 | amp_fp16 | fp32
    fsdp: bool = True  # an fsdp_config is given (LLM Foundry drops it on one GPU)
    sharding: str = 'FULL_SHARD'
    mixed_precision: str = 'PURE'
    activation_checkpointing: bool = True
    optimizer: str = 'decoupled_adamw'
    ep: int = 1
    ac_target: str = 'block'  # training.activation_checkpointing: block | attention | experts
    fused_cross_entropy: bool = False
    ce_chunk_tokens: int = 8192  # ops.cross_entropy.DEFAULT_CHUNK_TOKENS (not imported: plan stays torch-free)
    gqa_impl: str = 'auto'  # auto -> enable_gqa on CUDA in bf16/fp16 (model.py)

    def __post_init__(self) -> None:
        for name in ('gpus', 'seq_len', 'batch_per_gpu', 'microbatch', 'ep', 'ce_chunk_tokens'):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f'{name} ({value!r}) must be a positive integer')
        if self.precision not in ('amp_bf16', 'amp_fp16', 'fp32'):
            raise ValueError(f"precision ({self.precision!r}) must be one of ['amp_bf16', 'amp_fp16', 'fp32']")
        if self.sharding not in SHARDING:
            raise ValueError(f'fsdp_config.sharding_strategy ({self.sharding!r}) must be one of {list(SHARDING)}')
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f'fsdp_config.mixed_precision ({self.mixed_precision!r}) must be one of '
                             f'{list(MIXED_PRECISION)}')
        if self.optimizer not in OPTIMIZER_STATE_BYTES:
            raise ValueError(f'optimizer.name ({self.optimizer!r}) must be one of {sorted(OPTIMIZER_STATE_BYTES)}')
        if self.gpus % self.ep:
            raise ValueError(f'--ep ({self.ep}) must divide --gpus ({self.gpus})')

    @property
    def fsdp_active(self) -> bool:
        return self.fsdp and self.gpus > 1

    @property
    def checkpointing(self) -> bool:
        # one process too: LLM Foundry drops fsdp_config there, but dbrx_parallelize applies the YAML's checkpointing
        return self.activation_checkpointing


def param_counts(cfg: DbrxConfig) -> dict[str, int]:
    """Parameters by FSDP unit and kind: ``root`` (wte, norm_f, lm_head), ``block`` (one layer), ``block_experts``
    (one layer's w1, v1, w2), ``matrices`` (every weight autocast casts: all but wte and the norms), ``total``."""
    d, f, e = cfg.d_model, cfg.ffn_config.ffn_hidden_size, cfg.ffn_config.moe_num_experts
    qkv = (d + 2 * cfg.attn_config.kv_n_heads * cfg.head_dim) * d
    block_experts = 3 * e * f * d
    block = qkv + d * d + 2 * d + e * d + block_experts
    root = 2 * cfg.vocab_size * d + d
    total = cfg.n_layers * block + root
    matrices = cfg.n_layers * (block - 2 * d) + cfg.vocab_size * d
    assert total == cfg.num_params()['total']
    return {'root': root, 'block': block, 'block_experts': block_experts, 'matrices': matrices, 'total': total}


def attention_saved_bytes(cfg: DbrxConfig, tokens: int, c: int, n: int, gqa: str = 'repeat_kv') -> int:
    """Bytes ``DbrxNormAttentionNorm`` saves for backward (module docstring); ``gqa``: repeat_kv | enable_gqa."""
    t, d, h, g, hd = tokens, cfg.d_model, cfg.n_heads, cfg.attn_config.kv_n_heads, cfg.head_dim
    qkv = c * t * (d + 2 * g * hd)
    if g != h and gqa == 'repeat_kv':
        kv = 2 * c * t * h * hd  # K and V repeated to H heads
    else:  # k after RoPE, and v: a view of the clamped QKV, which it keeps whole
        kv = c * t * g * hd + qkv
    norms = 2 * (n * t * d + 8 * t)
    return norms + c * t * d + qkv + c * t * d + kv + c * t * d + 4 * t * h


def router_saved_bytes(cfg: DbrxConfig, tokens: int, c: int) -> int:
    e, k = cfg.ffn_config.moe_num_experts, cfg.ffn_config.moe_top_k
    # the input, fp32 probabilities, top-k indices and weights, the weights' norm; the z-loss's logsumexp keeps its
    # fp32 copy of the logits and its result
    return (c * tokens * cfg.d_model + 4 * tokens * e + 8 * tokens * k + 4 * tokens * k + 4 * tokens
            + 4 * tokens * e + 4 * tokens)


def experts_saved_bytes(cfg: DbrxConfig, tokens: int, c: int) -> int:
    """What the dispatcher and ``moe/grouped_mm.py``'s expert function save (the weights aside): the rows
    ``x_ND``, ``g_NF``, ``u_NF``, the routing weights ``w_N``, the expert offsets, and two int64 index vectors of
    the routing plan (each slot's sorted position for the gathers' backward, each row's token for the combine's)."""
    f, e, k = cfg.ffn_config.ffn_hidden_size, cfg.ffn_config.moe_num_experts, cfg.ffn_config.moe_top_k
    slots = tokens * k
    return c * slots * cfg.d_model + 2 * c * slots * f + c * slots + 16 * slots + 4 * e


def layer_saved_bytes(cfg: DbrxConfig, tokens: int, c: int, n: int, gqa: str = 'repeat_kv') -> int:
    return attention_saved_bytes(cfg, tokens, c, n, gqa) + router_saved_bytes(cfg, tokens, c) + \
        experts_saved_bytes(cfg, tokens, c)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU bytes by term, the phases built from them, and FLOPs."""

    terms: dict[str, float]
    phases: dict[str, float]
    notes: list[str]
    model_flops_per_token: int
    executed_flops_per_token: int

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def fits(self, gpu_memory: float) -> bool:
        return self.peak * 1.05 + 3 * GB <= gpu_memory


def plan_memory(cfg: DbrxConfig, s: TrainSetup) -> MemoryPlan:
    """The memory model of the module docstring for one microbatch size."""
    if cfg.ffn_config.moe_num_experts % s.ep:
        raise ValueError(f'--ep ({s.ep}) must divide ffn_config.moe_num_experts ({cfg.ffn_config.moe_num_experts})')
    pc = param_counts(cfg)
    notes = []
    amp = s.precision != 'fp32'
    c = 2 if amp else 4
    fsdp = s.fsdp_active
    if s.gpus == 1 and s.fsdp:
        notes.append('1 GPU: LLM Foundry drops fsdp_config, so no sharding (dbrx_parallelize still applies its '
                     'activation checkpointing); weights, gradients and optimizer state stay fp32 and whole')
    p_gather = 4 if (not fsdp or s.mixed_precision == 'FULL' or not amp) else 2
    r = 4 if (not fsdp or p_gather == 4) else 2
    n = 4
    shards = s.gpus if fsdp and s.sharding != 'NO_SHARD' else 1
    t = s.microbatch * s.seq_len
    gqa = s.gqa_impl
    if gqa == 'auto':
        gqa = 'enable_gqa' if amp else 'repeat_kv'  # what model.py picks on CUDA
    total, root, block, block_exp = pc['total'], pc['root'], pc['block'], pc['block_experts']
    terms: dict[str, float] = {}
    split = f'(1/{shards} of {total / 1e9:.2f}B)'
    terms[f'weights fp32 {split}'] = 4 * total / shards
    terms[f'gradients fp32 {split}'] = 4 * total / shards
    terms[f'optimizer state, {s.optimizer} {split}'] = OPTIMIZER_STATE_BYTES[s.optimizer] * total / shards
    # FSDP's gathered weights and unsharded gradients (or, without FSDP, a layer's weight gradients in backward)
    gathered_block = p_gather * (block - block_exp + block_exp / s.ep)
    root_weights = root_grad = fwd_blocks = 0.0
    if fsdp:
        root_weights = root_grad = p_gather * root
        if s.sharding == 'FULL_SHARD':
            fwd_blocks, bwd_blocks = 2 * gathered_block, 4 * gathered_block
        elif s.sharding == 'SHARD_GRAD_OP':
            fwd_blocks, bwd_blocks = cfg.n_layers * gathered_block, (cfg.n_layers + 2) * gathered_block
        else:  # NO_SHARD: a gathered low-precision copy of everything, when the gather dtype is not fp32
            fwd_blocks = p_gather * total if p_gather < 4 else 0.0
            bwd_blocks = fwd_blocks + 2 * gathered_block
    else:
        bwd_blocks = c * block
    terms['root unit gathered (wte, norm_f, lm_head)'] = root_weights
    terms['root unit gradient, backward'] = root_grad
    terms['blocks gathered, forward'] = fwd_blocks
    terms['blocks gathered + their gradients, backward'] = bwd_blocks
    terms['autocast weight copies (no FSDP)'] = c * pc['matrices'] if amp and not fsdp else 0.0
    terms['all-to-all buffers, one layer (EP)'] = \
        4 * t * cfg.ffn_config.moe_top_k * cfg.d_model * c if s.ep > 1 else 0.0
    # activations
    d, v = cfg.d_model, cfg.vocab_size
    layer = layer_saved_bytes(cfg, t, c, n, gqa)
    if s.checkpointing:
        terms['activations: block inputs (checkpointed)'] = cfg.n_layers * r * t * d
        if s.ep > 1 and s.ac_target == 'block':
            # parallelize.activation_checkpointing_fn: an expert-parallel block recomputes attention and the expert
            # GEMMs apart, so the dispatch (never replayed) keeps what it saves: the router's tensors, the exchanged
            # rows and their weights and index vectors, and the attention's output
            slots = t * cfg.ffn_config.moe_top_k
            terms['activations: block inputs (checkpointed)'] += cfg.n_layers * (
                router_saved_bytes(cfg, t, c) + c * slots * d + c * slots + 16 * slots + c * t * d)
        terms['activations: one block recomputed'] = layer
    else:
        terms['activations: all blocks'] = cfg.n_layers * layer
    terms['activations: head (norm_f, lm_head input, RoPE)'] = n * t * d + 8 * t + c * t * d + \
        8 * s.seq_len * cfg.head_dim
    slots = t * cfg.ffn_config.moe_top_k
    terms['backward buffers of one block'] = c * slots * (2 * d + cfg.ffn_config.ffn_hidden_size) + 2 * r * t * d
    if s.fused_cross_entropy:
        chunk = min(s.ce_chunk_tokens, t)
        terms['loss: forward'] = 4 * v * d + c * t * d + c * chunk * v + c * v * d
        terms['loss: backward start'] = 4 * v * d + c * t * d + c * v * d
    else:
        terms['loss: forward'] = ((c + 8) if amp else 8) * t * v  # logits, their fp32 copy, log_softmax's output
        terms['loss: backward start'] = (c + 12) * t * v
    static = (4 + 4 + OPTIMIZER_STATE_BYTES[s.optimizer]) * total / shards
    saved = terms.get('activations: block inputs (checkpointed)', 0.0) + terms.get('activations: all blocks', 0.0) \
        + terms['activations: head (norm_f, lm_head input, RoPE)'] + terms['autocast weight copies (no FSDP)']
    backward = static + root_weights + root_grad + bwd_blocks + saved
    largest_param = max(cfg.ffn_config.moe_num_experts * cfg.ffn_config.ffn_hidden_size * d, v * d)
    phases = {
        'A forward, loss': static + root_weights + fwd_blocks + saved + terms['loss: forward'],
        'B backward start': backward + terms['loss: backward start'],
        'C backward, first block': backward + terms.get('activations: one block recomputed', 0.0)
        + terms['backward buffers of one block'] + terms['all-to-all buffers, one layer (EP)'],
        'D optimizer step': static + 2 * 4 * largest_param / shards,
    }
    per_token = cfg.num_params()['active'] - v * d  # the input embedding is a lookup
    model_flops = 6 * per_token + 12 * cfg.n_layers * d * s.seq_len
    executed = model_flops
    if s.checkpointing:
        active_blocks = per_token - v * d - d  # lm_head and norm_f are outside the checkpointed blocks
        executed += 2 * active_blocks + 4 * cfg.n_layers * d * s.seq_len
    return MemoryPlan(terms, phases, notes, model_flops, executed)


# --- from a YAML --------------------------------------------------------------------------------------------------

def _model_config(model: Mapping[str, Any]) -> tuple[DbrxConfig, DbrxTrainingConfig]:
    """The architecture and training choices of a ``model:`` section, parsed and checked as the model does."""
    from foundry_dbrx.composer_model import config_from_model_section

    name = model.get('name', 'dbrx')
    if name != 'dbrx':
        raise ValueError(f"model.name ({name!r}) must be 'dbrx': plan knows the dbrx model only")
    return config_from_model_section(model)


def setup_from_yaml(yaml_path: str, overrides: tuple = (), *, gpus: int, ep: int = 1,
                    microbatch: Optional[int] = None) -> tuple[DbrxConfig, TrainSetup, dict]:
    """The architecture and training setup of a training YAML (with OmegaConf overrides) on ``gpus`` GPUs."""
    from omegaconf import OmegaConf as om

    from foundry_dbrx.train import load_config

    cfg = om.to_container(load_config(yaml_path, overrides), resolve=True)
    model = cfg.get('model') or {}
    arch, choices = _model_config(model)
    seq_len = int(((cfg.get('train_loader') or {}).get('dataset') or {}).get('max_seq_len')
                  or cfg.get('max_seq_len') or arch.max_seq_len)
    global_batch = cfg.get('global_train_batch_size')
    if not isinstance(global_batch, int) or global_batch % gpus:
        raise ValueError(f'global_train_batch_size ({global_batch!r}) must be an integer that --gpus ({gpus}) '
                         'divides')
    per_gpu = global_batch // gpus
    mb = cfg.get('device_train_microbatch_size', per_gpu)
    if microbatch is not None:
        mb = microbatch
    if mb == 'auto':
        mb = per_gpu
    fsdp_cfg = cfg.get('fsdp_config')
    training = {'fused_cross_entropy': choices.fused_cross_entropy, 'gqa_impl': choices.gqa_impl,
                'ac_target': choices.activation_checkpointing}
    if ep == 1:
        ep = choices.expert_parallel_degree
    setup = TrainSetup(
        gpus=gpus, ep=ep, seq_len=seq_len, batch_per_gpu=per_gpu, microbatch=int(mb),
        precision=cfg.get('precision', 'amp_bf16'), fsdp=fsdp_cfg is not None,
        sharding=(fsdp_cfg or {}).get('sharding_strategy', 'FULL_SHARD'),
        mixed_precision=str((fsdp_cfg or {}).get('mixed_precision', 'DEFAULT')).upper(),
        activation_checkpointing=bool((fsdp_cfg or {}).get('activation_checkpointing', False)),
        optimizer=(cfg.get('optimizer') or {}).get('name', 'decoupled_adamw'), **training)
    return arch, setup, cfg


def plan_communication(cfg: DbrxConfig, s: TrainSetup) -> dict[str, float]:
    """Bytes each GPU sends per optimizer step, by collective (the module docstring's model)."""
    if not s.fsdp_active and s.ep == 1:
        return {}
    pc = param_counts(cfg)
    amp = s.precision != 'fp32'
    c = 2 if amp else 4
    p = 4 if (s.mixed_precision == 'FULL' or not amp) else 2
    g = 2 if s.mixed_precision == 'PURE' and amp else 4
    micro = s.batch_per_gpu // s.microbatch
    layers = cfg.n_layers
    experts = layers * pc['block_experts']
    dense_blocks = layers * (pc['block'] - pc['block_experts']) + (experts if s.ep == 1 else 0)
    dense_all = dense_blocks + pc['root']
    local_experts = experts / s.ep if s.ep > 1 else 0.0

    def ring(group: int) -> float:
        return (group - 1) / group if group > 1 else 0.0

    world = s.gpus if s.sharding != 'NO_SHARD' else 1
    expert_group = s.gpus // s.ep
    forward = p * (ring(world) * dense_all + ring(expert_group) * local_experts)
    backward = 0.0 if s.sharding == 'SHARD_GRAD_OP' else \
        p * (ring(world) * dense_blocks + ring(expert_group) * local_experts)
    reduce = g * (ring(s.gpus) * dense_all + ring(expert_group) * local_experts)
    out = {'FSDP all-gather': micro * (forward + backward), 'FSDP reduce-scatter': micro * reduce}
    if s.ep > 1:
        slots = s.microbatch * s.seq_len * cfg.ffn_config.moe_top_k
        exchanges = 4  # rows out and back, forward and backward; checkpointing never replays them
        out['EP all-to-all'] = micro * layers * exchanges * ring(s.ep) * slots * cfg.d_model * c
    return out


def _gb(x: float) -> str:
    return f'{x / GB:8.2f}'


def report(arch: DbrxConfig, setup: TrainSetup, gpu_memory: float, peak_tflops: float = PEAK_TFLOPS) -> str:
    """The printed plan: setup, per-term table, phases, microbatch sweep, FLOPs."""
    pc = param_counts(arch)
    p = plan_memory(arch, setup)
    lines = [f'DBRX: {pc["total"] / 1e9:.2f}B parameters ({arch.num_params()["active"] / 1e9:.2f}B active), '
             f'{arch.n_layers} layers, d_model {arch.d_model}, {arch.ffn_config.moe_num_experts} experts top-'
             f'{arch.ffn_config.moe_top_k}, vocabulary {arch.vocab_size}',
             f'setup: {setup.gpus} GPU(s), EP {setup.ep}, sequence {setup.seq_len}, {setup.batch_per_gpu} sequences '
             f'per GPU per step in microbatches of {setup.microbatch}, {setup.precision}, '
             + (f'FSDP {setup.sharding} {setup.mixed_precision}, ' if setup.fsdp_active else 'no FSDP, ')
             + f'activation checkpointing {"on" if setup.checkpointing else "off"}, {setup.optimizer}, '
             f'cross entropy {"fused (chunked)" if setup.fused_cross_entropy else "plain (full logits)"}']
    lines += [f'note: {n}' for n in p.notes]
    lines += ['', f'{"GB per GPU":>10}  term']
    lines += [f'{_gb(v):>10}  {k}' for k, v in p.terms.items()]
    lines += ['', 'phases (GB per GPU, allocated):']
    lines += [f'{_gb(v):>10}  {k}{"   <- peak" if k == p.peak_phase else ""}' for k, v in p.phases.items()]
    verdict = 'fits' if p.fits(gpu_memory) else 'does NOT fit'
    lines += ['', f'peak {p.peak / GB:.1f} GB allocated (about {(p.peak * 1.05 + 3 * GB) / GB:.1f} GB on the device): '
              f'{verdict} in {gpu_memory / GB:.0f} GB']
    sweep, best = [], None
    for mb in [m for m in range(1, setup.batch_per_gpu + 1) if setup.batch_per_gpu % m == 0]:
        q = plan_memory(arch, dataclasses.replace(setup, microbatch=mb))
        ok = q.fits(gpu_memory)
        best = mb if ok else best
        sweep.append(f'{mb:>5} {q.peak / GB:9.1f}  {"fits" if ok else "-"}')
    lines += ['', 'microbatch  peak GB', *sweep,
              f'recommended microbatch: {best}' if best else 'recommended microbatch: none fits; use more GPUs '
              'or --ep, or turn activation checkpointing / the fused cross entropy on']
    comm = plan_communication(arch, setup)
    if comm:
        lines += ['', 'bytes each GPU sends per step (GB):']
        lines += [f'{_gb(v):>10}  {k}' for k, v in comm.items()]
        total = sum(comm.values())
        lines += [f'{_gb(total):>10}  in all: {total / 400e9 * 1e3:.0f} ms at 400 GB/s (NVLink), '
                  f'{total / 50e9 * 1e3:.0f} ms at 50 GB/s (400 Gb/s InfiniBand per GPU)']
    tokens = setup.batch_per_gpu * setup.seq_len
    lines += ['', f'FLOPs per GPU per step: model {p.model_flops_per_token * tokens / 1e15:.2f} PFLOP '
              f'({p.model_flops_per_token / 1e9:.2f} GFLOP/token, the MFU convention), executed '
              f'{p.executed_flops_per_token * tokens / 1e15:.2f} PFLOP (activation checkpointing\'s recompute '
              f'included); at {peak_tflops:.0f} TFLOP/s the step takes at least '
              f'{p.executed_flops_per_token * tokens / (peak_tflops * 1e12):.2f} s, at 50% MFU '
              f'{p.model_flops_per_token * tokens / (0.5 * peak_tflops * 1e12):.2f} s']
    return '\n'.join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('yaml', help='training YAML (model.name: dbrx)')
    parser.add_argument('overrides', nargs='*', help='dotted overrides, e.g. model.n_layers=8')
    parser.add_argument('--gpus', type=int, required=True, help='number of GPUs (FSDP world size)')
    parser.add_argument('--ep', type=int, default=1, help='expert-parallel degree (divides --gpus and the experts)')
    parser.add_argument('--microbatch', type=int, default=None, help='instead of device_train_microbatch_size')
    parser.add_argument('--gpu-memory', type=float, default=141.0, help='GB per GPU (default: H200, 141)')


def run(args: argparse.Namespace) -> int:
    try:
        if args.gpus <= 0 or args.ep <= 0:
            raise ValueError(f'--gpus ({args.gpus}) and --ep ({args.ep}) must be positive')
        if not math.isfinite(args.gpu_memory) or args.gpu_memory <= 0:
            raise ValueError(f'--gpu-memory ({args.gpu_memory}) must be a positive number of GB')
        arch, setup, _ = setup_from_yaml(args.yaml, tuple(args.overrides), gpus=args.gpus, ep=args.ep,
                                         microbatch=args.microbatch)
        print(report(arch, setup, args.gpu_memory * GB))
    except (ValueError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0
