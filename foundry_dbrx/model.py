"""DBRX on a single device: embedding, blocks (attention + MoE FFN), final norm and untied head.

Module and parameter names are HF transformers' ``DbrxForCausalLM`` names, so a state dict of this model loads
into transformers by key name alone. Parallelism (FSDP, activation checkpointing) is applied from outside.

Legend: B batch, S sequence, D d_model, H query heads, G kv heads, Hd head dim, V vocab.
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from foundry_dbrx.config import GQA_IMPLS, DbrxConfig, DbrxTrainingConfig
from foundry_dbrx.moe.layer import DbrxFFN
from foundry_dbrx.moe.router import DbrxRouter, Routing
from foundry_dbrx.ops.cross_entropy import linear_cross_entropy
from foundry_dbrx.ops.weight_grad import cast_weight, compute_dtype

__all__ = ['DbrxForCausalLM', 'DbrxModel', 'DbrxBlock', 'DbrxAttention', 'DbrxOutput', 'DbrxLossOutput',
           'rotary_cos_sin', 'assign_full', 'GQA_IMPLS']

# How attention meets K/V with fewer heads than Q (config.GQA_IMPLS): 'repeat_kv' repeats them per query group first
# (HF's way, the CPU path of the parity tests); 'enable_gqa' hands SDPA the G heads (torch >= 2.5: its flash kernel
# reads each K/V head once per group, nothing repeated in memory); 'auto' takes enable_gqa for fp16/bf16 on CUDA.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split('.')[:2]) >= (2, 5)


class DbrxOutput(NamedTuple):
    logits: torch.Tensor  # [B, S, V]
    routings: tuple[Routing, ...]  # one per layer, for the auxiliary losses


class DbrxLossOutput(NamedTuple):
    ce_sum: torch.Tensor  # fp32 scalar: the cross entropy summed over the targets that are not ignored
    routings: tuple[Routing, ...]


def rotary_cos_sin(positions_S: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, Hd] of non-interleaved (rotate-half) RoPE, computed in fp32 as HF does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions_S.device)
                                .float() / head_dim))
    freqs_SH = positions_S.float()[:, None] * inv_freq[None, :]
    emb_SHd = torch.cat((freqs_SH, freqs_SH), dim=-1)
    return emb_SHd.cos(), emb_SHd.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x_BHSd: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
    # cos/sin are cast to the activation dtype before use, as transformers does (bit parity in bf16).
    cos, sin = cos_SHd.to(x_BHSd.dtype), sin_SHd.to(x_BHSd.dtype)
    return x_BHSd * cos + _rotate_half(x_BHSd) * sin


class DbrxAttention(nn.Module):
    """Causal GQA self-attention with DBRX's clip on the fused QKV projection (before the split and RoPE)."""

    def __init__(self, cfg: DbrxConfig, device=None, gqa_impl: str = 'auto'):
        super().__init__()
        a = cfg.attn_config
        self.n_heads, self.kv_n_heads, self.head_dim = cfg.n_heads, a.kv_n_heads, cfg.head_dim
        self.gqa_impl = check_gqa_impl(gqa_impl)
        self.clip_qkv, self.rope_theta, self.attn_pdrop = a.clip_qkv, a.rope_theta, a.attn_pdrop
        qkv_out = cfg.d_model + 2 * self.kv_n_heads * self.head_dim
        self.Wqkv = nn.Linear(cfg.d_model, qkv_out, bias=False, device=device)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False, device=device)
        self.out_proj.residual_out_params = ('weight',)  # scaled init: it writes into the residual stream

    def forward(self, x_BSD: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
        b, s, d = x_BSD.shape
        qkv = self.Wqkv(x_BSD)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        kv_dim = self.kv_n_heads * self.head_dim
        q, k, v = qkv.split([d, kv_dim, kv_dim], dim=-1)
        q_BHSd = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGSd = k.view(b, s, self.kv_n_heads, self.head_dim).transpose(1, 2)
        v_BGSd = v.view(b, s, self.kv_n_heads, self.head_dim).transpose(1, 2)
        q_BHSd = apply_rotary(q_BHSd, cos_SHd, sin_SHd)
        k_BGSd = apply_rotary(k_BGSd, cos_SHd, sin_SHd)
        gqa = {}
        if self.kv_n_heads != self.n_heads:
            impl = self.gqa_impl
            if impl == 'auto':
                impl = 'enable_gqa' if (_SDPA_HAS_GQA and q_BHSd.is_cuda
                                        and q_BHSd.dtype in (torch.float16, torch.bfloat16)) else 'repeat_kv'
            if impl == 'enable_gqa':
                gqa = {'enable_gqa': True}
            else:  # repeat K/V per query group, as HF does
                rep = self.n_heads // self.kv_n_heads
                k_BGSd = k_BGSd.repeat_interleave(rep, dim=1)
                v_BGSd = v_BGSd.repeat_interleave(rep, dim=1)
        o_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BGSd, v_BGSd, is_causal=True,
                                                dropout_p=self.attn_pdrop if self.training else 0.0,
                                                scale=1.0 / math.sqrt(self.head_dim), **gqa)
        return self.out_proj(o_BHSd.transpose(1, 2).reshape(b, s, d))


def check_gqa_impl(gqa_impl: str) -> str:
    if gqa_impl not in GQA_IMPLS:
        raise ValueError(f'gqa_impl ({gqa_impl!r}) must be one of {list(GQA_IMPLS)}')
    if gqa_impl == 'enable_gqa' and not _SDPA_HAS_GQA:
        raise ValueError(f"gqa_impl 'enable_gqa' needs torch >= 2.5 (this is {torch.__version__}); use 'repeat_kv'")
    return gqa_impl


class DbrxNormAttentionNorm(nn.Module):
    """``norm_1 -> attn -> residual add -> norm_2``, grouped as HF groups them (hence the parameter names)."""

    def __init__(self, cfg: DbrxConfig, device=None):
        super().__init__()
        self.norm_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False, device=device)
        self.attn = DbrxAttention(cfg, device=device)
        self.norm_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False, device=device)
        self.resid_pdrop = cfg.resid_pdrop

    def forward(self, x_BSD, cos_SHd, sin_SHd) -> tuple[torch.Tensor, torch.Tensor]:
        h_BSD = self.attn(self.norm_1(x_BSD).to(x_BSD.dtype), cos_SHd, sin_SHd)
        x_BSD = x_BSD + F.dropout(h_BSD, self.resid_pdrop, self.training)
        return x_BSD, self.norm_2(x_BSD).to(x_BSD.dtype)


class DbrxBlock(nn.Module):
    def __init__(self, cfg: DbrxConfig, training: DbrxTrainingConfig, device=None):
        super().__init__()
        self.norm_attn_norm = DbrxNormAttentionNorm(cfg, device=device)
        self.ffn = DbrxFFN(cfg.d_model, cfg.ffn_config, backend=training.moe_backend,
                           bias_balancing=training.moe_bias_balancing, device=device)
        self.resid_pdrop = cfg.resid_pdrop

    def forward(self, x_BSD, cos_SHd, sin_SHd) -> tuple[torch.Tensor, Routing]:
        x_BSD, h_BSD = self.norm_attn_norm(x_BSD, cos_SHd, sin_SHd)
        y_BSD, routing = self.ffn(h_BSD)
        return x_BSD + F.dropout(y_BSD, self.resid_pdrop, self.training), routing


class DbrxModel(nn.Module):
    """The transformer trunk (HF's ``transformer.``): ``wte``, ``blocks``, ``norm_f``."""

    def __init__(self, cfg: DbrxConfig, training: Optional[DbrxTrainingConfig] = None, device=None):
        super().__init__()
        self.cfg = cfg
        training = training or DbrxTrainingConfig()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model, device=device)
        self.blocks = nn.ModuleList([DbrxBlock(cfg, training, device=device) for _ in range(cfg.n_layers)])
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False, device=device)
        self.emb_pdrop = cfg.emb_pdrop

    def forward(self, input_ids_BS: torch.Tensor) -> tuple[torch.Tensor, tuple[Routing, ...]]:
        s = input_ids_BS.shape[1]
        if s > self.cfg.max_seq_len:
            raise ValueError(f'input length ({s}) must be at most max_seq_len ({self.cfg.max_seq_len})')
        x_BSD = F.dropout(self.wte(input_ids_BS), self.emb_pdrop, self.training)
        positions_S = torch.arange(s, device=input_ids_BS.device)
        cos_SHd, sin_SHd = rotary_cos_sin(positions_S, self.cfg.head_dim, self.cfg.attn_config.rope_theta)
        routings = []
        for block in self.blocks:
            x_BSD, routing = block(x_BSD, cos_SHd, sin_SHd)
            routings.append(routing)
        return self.norm_f(x_BSD), tuple(routings)


class DbrxForCausalLM(nn.Module):
    """DBRX language model: ``DbrxForCausalLM(cfg)(input_ids)`` returns the logits and each layer's routing;
    ``(input_ids, targets=...)`` returns the summed cross entropy instead, without materialising the logits.

    ``training`` supplies the expert backend and whether the routers choose with their balancing bias (the rest of
    it, such as expert parallelism, is applied from outside by :mod:`foundry_dbrx.parallelize`).
    """

    def __init__(self, cfg: DbrxConfig, training: Optional[DbrxTrainingConfig] = None, device=None):
        super().__init__()
        self.config = cfg
        self.training_config = training or DbrxTrainingConfig()
        self.transformer = DbrxModel(cfg, self.training_config, device=device)
        for module in self.transformer.modules():
            if isinstance(module, DbrxAttention):
                module.gqa_impl = check_gqa_impl(self.training_config.gqa_impl)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, device=device)
        compile_blocks(self.transformer.blocks, self.training_config.compile)
        # Every parameter's initial value depends only on this seed (the run's, as Composer seeds torch before it
        # builds the model) and the parameter's name: see init_module. Module names are kept by identity, as
        # wrappers (FSDP, activation checkpointing) add infixes to the names but keep the modules.
        self.init_seed = torch.initial_seed()
        self._module_names = {id(m): name for name, m in self.named_modules()}
        if torch.device(device or 'cpu').type != 'meta':
            self.reset_parameters()

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """``DbrxOutput`` (logits), or with ``targets`` ([B, S], -100 ignored) ``DbrxLossOutput``: the head and the
        cross entropy run chunk by chunk (:func:`foundry_dbrx.ops.linear_cross_entropy`). The head weight is used
        here, inside forward, where FSDP has it gathered."""
        h_BSD, routings = self.transformer(input_ids)
        # The head's cast to the compute dtype, with the gradient added straight into the fp32 .grad (ops.weight_grad);
        # F.linear under autocast would cast it the same way.
        weight_VD = cast_weight(self.lm_head.weight, compute_dtype(h_BSD))
        if targets is None:
            return DbrxOutput(F.linear(h_BSD, weight_VD), routings)
        return DbrxLossOutput(linear_cross_entropy(h_BSD, weight_VD, targets), routings)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every matrix, the residual-writing ones scaled by 1/sqrt(2 L); ones
        for the norms; zeros for the routers' balancing bias."""
        for module in self.modules():
            self.init_module(module)

    @torch.no_grad()
    def init_module(self, module: nn.Module) -> None:
        """Initialises the parameters owned directly by ``module`` (FSDP's ``param_init_fn`` calls this module by
        module when the model was built on the meta device).

        Each parameter's full value is drawn from a generator seeded by ``init_seed`` and the parameter's name, and a
        sharded parameter (a DTensor) keeps its shard of it: the model is the same whatever the order of
        initialisation, the world size, the FSDP version or the expert-parallel degree. Values are drawn on the GPU
        where there is one, whatever device the parameter lives on: CPU and CUDA generators give different streams,
        and LLM Foundry builds single-GPU models on the CPU where FSDP would build them on the GPU.
        """
        std = self.config.initializer_range
        if isinstance(module, DbrxRouter):
            module.reset_expert_bias()  # a buffer: materialising a meta-device module leaves it uninitialised
        prefix = self._module_names[id(module)]
        draw_on = torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else None
        for name, param in module.named_parameters(recurse=False):
            device = _local(param).device
            if isinstance(module, nn.LayerNorm):
                full = torch.ones(param.shape, dtype=param.dtype, device=device)
            else:
                scale = (std / math.sqrt(2 * self.config.n_layers)
                         if name in getattr(module, 'residual_out_params', ()) else std)
                fqn = f'{prefix}.{name}' if prefix else name
                gen_device = draw_on or device
                gen = torch.Generator(device=gen_device).manual_seed(
                    (self.init_seed * 1_000_003 + zlib.crc32(fqn.encode())) % 2**63)
                full = torch.empty(param.shape, dtype=param.dtype, device=gen_device).normal_(0.0, scale,
                                                                                             generator=gen)
            assign_full(param, full.to(device))


# Keyword arguments of every torch.compile call the model makes (tests compile with backend='aot_eager', which needs
# no C++ compiler on the CPU).
COMPILE_KWARGS: dict = {}


def compile_blocks(blocks: nn.ModuleList, target: str) -> None:
    """``training.compile``: marks each block's attention part (``attention``) or the whole block (``block``) for
    ``torch.compile``, in place (``nn.Module.compile``: the module keeps its parameters and names, so FSDP,
    activation checkpointing and state dicts see the same module tree). The expert computation and the token
    dispatch stay outside the graph under ``block`` (our Triton and grouped-GEMM kernels, and custom autograd
    functions that run the expert-parallel exchanges): dynamo stops before them and resumes after."""
    if target == 'none':
        return
    for block in blocks:
        if target == 'attention':
            block.norm_attn_norm.compile(**COMPILE_KWARGS)
        else:
            block.ffn.run_experts = torch.compiler.disable(block.ffn.run_experts)
            block.compile(**COMPILE_KWARGS)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, 'to_local') else t


def assign_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param.copy_(full)`` for a plain tensor; for a DTensor, copies this rank's shard of ``full`` (the whole
    value, the same on every rank) into the local shard, with no communication."""
    if hasattr(param, 'device_mesh'):
        from torch.distributed.tensor import distribute_tensor
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)
