"""DBRX configuration: the architecture (HF DBRX's ``config.json``) apart from the training choices.

``DbrxConfig.from_dict`` takes the keys of a Hugging Face DBRX ``config.json`` (``d_model``, ``n_heads``,
``attn_config: {...}``, ``ffn_config: {...}``) or the architecture keys of a YAML ``model:`` section, and rejects
anything it does not know. Every size is required: a YAML that leaves one out is an error, not a silent default.

``DbrxTrainingConfig`` holds what HF's config does not: the expert backend, the load-balancing formula, expert
parallelism, the activation-checkpointing plan. A YAML gives it as ``model.training: {...}``.

Every rule lives in a ``__post_init__`` and its error names the field, the value and the rule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

__all__ = ['DbrxAttentionConfig', 'DbrxFFNConfig', 'DbrxConfig', 'DbrxTrainingConfig', 'MOE_BACKENDS', 'LB_LOSS_TYPES',
           'AC_TARGETS', 'COMPILE_TARGETS', 'ROUTER_BIAS_HF_KEY']

# Names of the expert backends a config may ask for; the classes live in ``foundry_dbrx.moe.experts``.
MOE_BACKENDS = ('auto', 'eager', 'grouped_mm', 'megablocks', 'grouped_mm_triton')
# 'switch': HF DBRX / Switch Transformer, E * sum_e f_e P_e over all layers' tokens concatenated.
# 'megablocks': MegaBlocks / LLM Foundry, per-layer E/(T*k) * sum_e count_e * mean_p_e, averaged over layers.
LB_LOSS_TYPES = ('switch', 'megablocks')
# Over which tokens the load-balancing statistics are gathered (foundry_dbrx/moe/losses.py).
LB_LOSS_SCOPES = ('global', 'local')
# How attention meets K/V with fewer heads than Q (foundry_dbrx/model.py).
GQA_IMPLS = ('auto', 'repeat_kv', 'enable_gqa')
# What activation checkpointing wraps when the YAML turns it on (fsdp_config.activation_checkpointing: true).
AC_TARGETS = ('block', 'attention', 'experts')
COMPILE_TARGETS = ('none', 'attention', 'block')

# Where an HF export carries the routers' expert biases (aux-loss-free balancing, [n_layers][moe_num_experts]):
# a top-level config.json key, which transformers keeps as an attribute and ignores. State, not architecture, so
# the config skips it and foundry_dbrx.hf reads it (docs/moe.md).
ROUTER_BIAS_HF_KEY = 'foundry_dbrx_router_bias'

# Keys HF's DbrxConfig writes into config.json that carry no meaning for the model's math.
_HF_BOOKKEEPING_KEYS = frozenset({
    ROUTER_BIAS_HF_KEY,
    'architectures', 'auto_map', 'model_type', 'torch_dtype', 'transformers_version', 'use_cache',
    'output_router_logits', 'router_aux_loss_coef', 'tie_word_embeddings', 'return_dict', 'output_hidden_states',
    'output_attentions', 'torchscript', 'pad_token_id', 'bos_token_id', 'eos_token_id', '_name_or_path',
    'is_encoder_decoder', 'num_key_value_heads', 'hidden_size', 'num_attention_heads', 'num_hidden_layers',
    'max_position_embeddings', 'tokenizer_class', 'attn_implementation', '_attn_implementation_autoset',
})
_HF_ATTN_BOOKKEEPING_KEYS = frozenset({'model_type'})
_HF_FFN_BOOKKEEPING_KEYS = frozenset({'model_type', 'moe_num_experts_per_tok'})


def _check_positive(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f'{owner}{name} ({value!r}) must be a positive integer')


def _is_number(value: Any) -> bool:
    """A finite int or float; bools, NaN and infinities are not (NaN slips through every ``<=`` check)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fraction(owner: str, name: str, value: float) -> None:
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f'{owner}{name} ({value!r}) must be a number in [0, 1)')


def _reject_unknown(cls: type, values: Mapping[str, Any], where: str, ignored: frozenset = frozenset(),
                    moved_to_training: Mapping[str, str] = {}) -> dict:
    """The known keys of ``values``; an unknown key, a training choice given in the architecture
    (``moved_to_training``: old key -> ``model.training`` key), or a missing required field (one without a
    default) is a ValueError listing them."""
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    moved = sorted(k for k in values if k in moved_to_training)
    if moved:
        raise ValueError(f'{where}: {", ".join(moved)} ' + ('is a training choice' if len(moved) == 1 else
                         'are training choices') + ', not part of the HF DBRX config: set ' +
                         ', '.join(f'model.training.{moved_to_training[k]}' for k in moved) + ' instead')
    unknown = sorted(set(values) - known - ignored)
    if unknown:
        raise ValueError(f'{where}: unknown key(s) {unknown}; known keys are {sorted(known)}')
    missing = [f.name for f in fields
               if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f'{where}: missing required key(s) {missing}: architecture fields have no default '
                         '(give them in the YAML, or start from an HF config with pretrained_hf_dir)')
    return {k: v for k, v in values.items() if k in known}


# Keys that older YAMLs put into ffn_config and that now live in model.training (old name -> new name).
_MOVED_TO_TRAINING = {'moe_backend': 'moe_backend', 'moe_lb_loss_type': 'moe_lb_loss_type'}


@dataclass(kw_only=True, frozen=True)
class DbrxAttentionConfig:
    """Attention part of the config (HF's ``attn_config``)."""

    attn_pdrop: float = 0.0
    # Required, though HF has defaults: clip_qkv (null: no clipping) and rope_theta (HF's default 10000 is not
    # DBRX's 500000) change the math, and a silent default is the trap transformers 5.x fell into.
    clip_qkv: Optional[float]
    kv_n_heads: int
    rope_theta: float

    def __post_init__(self) -> None:
        _check_fraction('attn_config.', 'attn_pdrop', self.attn_pdrop)
        _check_positive('attn_config.', 'kv_n_heads', self.kv_n_heads)
        if self.clip_qkv is not None and (not _is_number(self.clip_qkv) or self.clip_qkv <= 0):
            raise ValueError(f'attn_config.clip_qkv ({self.clip_qkv!r}) must be a positive number or null (no clipping)')
        if not _is_number(self.rope_theta) or self.rope_theta <= 0:
            raise ValueError(f'attn_config.rope_theta ({self.rope_theta!r}) must be a positive number')

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> 'DbrxAttentionConfig':
        return cls(**_reject_unknown(cls, values, 'attn_config', _HF_ATTN_BOOKKEEPING_KEYS))


@dataclass(kw_only=True, frozen=True)
class DbrxFFNConfig:
    """Mixture-of-experts part of the config (HF's ``ffn_config``)."""

    ffn_hidden_size: int
    moe_num_experts: int
    moe_top_k: int
    moe_jitter_eps: Optional[float] = None
    # HF keeps the load-balancing weight in its config (DBRX: 0.05), so it lives here and round-trips through HF;
    # which formula it weighs is a training choice (DbrxTrainingConfig.moe_lb_loss_type).
    moe_loss_weight: float = 0.01
    moe_normalize_expert_weights: Optional[float] = 1.0
    ffn_act_fn: Optional[dict] = None

    def __post_init__(self) -> None:
        _check_positive('ffn_config.', 'ffn_hidden_size', self.ffn_hidden_size)
        _check_positive('ffn_config.', 'moe_num_experts', self.moe_num_experts)
        _check_positive('ffn_config.', 'moe_top_k', self.moe_top_k)
        if self.moe_top_k > self.moe_num_experts:
            raise ValueError(
                f'ffn_config.moe_top_k ({self.moe_top_k}) must be at most ffn_config.moe_num_experts '
                f'({self.moe_num_experts})')
        if self.moe_jitter_eps is not None:
            _check_fraction('ffn_config.', 'moe_jitter_eps', self.moe_jitter_eps)
        if not _is_number(self.moe_loss_weight) or self.moe_loss_weight < 0:
            raise ValueError(f'ffn_config.moe_loss_weight ({self.moe_loss_weight!r}) must be a number >= 0')
        p = self.moe_normalize_expert_weights
        if p is not None and (not _is_number(p) or p <= 0):
            raise ValueError(
                f'ffn_config.moe_normalize_expert_weights ({p!r}) must be a positive number (the p of the p-norm) '
                'or null (no renormalisation)')
        act = self.ffn_act_fn
        if act is not None and (not isinstance(act, Mapping) or act.get('name', 'silu') != 'silu'):
            raise ValueError(f"ffn_config.ffn_act_fn ({act!r}) must be {{'name': 'silu'}}: DBRX experts are SiLU GLUs")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> 'DbrxFFNConfig':
        return cls(**_reject_unknown(cls, values, 'ffn_config', _HF_FFN_BOOKKEEPING_KEYS, _MOVED_TO_TRAINING))


@dataclass(kw_only=True, frozen=True)
class DbrxConfig:
    """The whole DBRX model config, with HF DBRX's field names.

    ``DbrxConfig.from_dict(json.load(open('config.json')))`` loads a Hugging Face DBRX config as it is, and a YAML
    ``model:`` section uses the same names. ``initializer_range`` is the std of the normal init (HF's name);
    where the weights are built (``init_device``) is the Composer model's business, not the config's.
    """

    d_model: int
    n_heads: int
    n_layers: int
    max_seq_len: int
    vocab_size: int
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    attn_config: DbrxAttentionConfig
    ffn_config: DbrxFFNConfig

    def __post_init__(self) -> None:
        for name in ('d_model', 'n_heads', 'n_layers', 'max_seq_len', 'vocab_size'):
            _check_positive('', name, getattr(self, name))
        _check_fraction('', 'resid_pdrop', self.resid_pdrop)
        _check_fraction('', 'emb_pdrop', self.emb_pdrop)
        if not _is_number(self.layer_norm_eps) or self.layer_norm_eps <= 0:
            raise ValueError(f'layer_norm_eps ({self.layer_norm_eps!r}) must be a positive number')
        if not _is_number(self.initializer_range) or self.initializer_range <= 0:
            raise ValueError(f'initializer_range ({self.initializer_range!r}) must be a positive number')
        if self.d_model % self.n_heads:
            raise ValueError(f'n_heads ({self.n_heads}) must divide d_model ({self.d_model})')
        if self.head_dim % 2:
            raise ValueError(f'd_model / n_heads ({self.head_dim}) must be even for rotary embeddings')
        kv = self.attn_config.kv_n_heads
        if self.n_heads % kv:
            raise ValueError(f'attn_config.kv_n_heads ({kv}) must divide n_heads ({self.n_heads})')

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> 'DbrxConfig':
        """Builds a config from an HF ``config.json`` dict or a YAML ``model:`` section; unknown keys raise."""
        values = dict(values)
        attn = values.pop('attn_config', None) or {}
        ffn = values.pop('ffn_config', None) or {}
        kwargs = _reject_unknown(cls, {**values, 'attn_config': None, 'ffn_config': None}, 'model config',
                                 _HF_BOOKKEEPING_KEYS)
        del kwargs['attn_config'], kwargs['ffn_config']
        attn_cfg = attn if isinstance(attn, DbrxAttentionConfig) else DbrxAttentionConfig.from_dict(attn)
        ffn_cfg = ffn if isinstance(ffn, DbrxFFNConfig) else DbrxFFNConfig.from_dict(ffn)
        return cls(**kwargs, attn_config=attn_cfg, ffn_config=ffn_cfg)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict with HF DBRX's key names."""
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` of an HF ``DbrxForCausalLM`` with these weights (no remote code needed)."""
        out = self.to_dict()
        out.update(model_type='dbrx', architectures=['DbrxForCausalLM'], tie_word_embeddings=False)
        return out

    # --- parameter counting (pure arithmetic, no weights) --------------------------------------------------------
    def num_params(self) -> dict[str, int]:
        """Parameter counts: ``total``, ``active`` per token (experts at top_k / E), and ``embedding``."""
        d, f = self.d_model, self.ffn_config.ffn_hidden_size
        e, k = self.ffn_config.moe_num_experts, self.ffn_config.moe_top_k
        qkv_out = d + 2 * self.attn_config.kv_n_heads * self.head_dim
        attn = qkv_out * d + d * d + 2 * d  # Wqkv, out_proj, norm_1, norm_2
        router = e * d
        experts = 3 * e * f * d
        embedding = 2 * self.vocab_size * d  # wte and the untied lm_head
        total = self.n_layers * (attn + router + experts) + embedding + d
        active = self.n_layers * (attn + router + 3 * k * f * d) + embedding + d
        return {'total': total, 'active': active, 'embedding': embedding}


@dataclass(kw_only=True, frozen=True)
class DbrxTrainingConfig:
    """Training choices that HF's DBRX config does not hold (a YAML's ``model.training:`` section).

    Args:
        moe_backend: how the experts run (``auto`` picks the fastest backend the device has; docs/backends.md).
        moe_lb_loss_type: the load-balancing formula, ``megablocks`` (MegaBlocks / LLM Foundry) or ``switch``
            (HF DBRX / Switch Transformer); weighted by ``ffn_config.moe_loss_weight``.
        moe_lb_loss_scope: the tokens whose routing statistics the loss is formed from: ``global``, every
            data-parallel rank's microbatch (one small all-reduce per microbatch; the loss of the global batch,
            the same at any world size and expert-parallel degree) or ``local``, this rank's (MegaBlocks').
        expert_parallel_degree: ranks that share one copy of the experts, each holding ``moe_num_experts /
            expert_parallel_degree`` of them; tokens reach their experts by all-to-all. It must divide the expert
            count and the ranks of a shard group (checked when the model is parallelised). 1: no expert
            parallelism. Needs FSDP2 (docs/parallelism.md).
        data_parallel_replicate_degree: copies of the sharded model (HSDP): parameters are sharded within groups
            of ``world / data_parallel_replicate_degree`` ranks (a node, typically) and replicated across them.
            Needs FSDP2. 1: shard over the whole world.
        activation_checkpointing: what activation checkpointing recomputes when the YAML turns it on
            (``fsdp_config.activation_checkpointing: true``): ``block`` (the whole block), ``attention`` (norms and
            attention) or ``experts`` (the expert GEMMs, not the dispatch: no all-to-all is replayed).
        activation_checkpointing_every: checkpoint every n-th block only (1: every block).
        fused_cross_entropy: in training, compute the loss with the chunked linear cross entropy
            (:mod:`foundry_dbrx.ops.cross_entropy`): no [B, S, V] logits; the train metrics are updated from its
            sums. Evaluation still computes logits.
        gqa_impl: how attention uses the fewer K/V heads: ``auto`` (SDPA's ``enable_gqa`` for fp16/bf16 on CUDA,
            else ``repeat_kv``), ``repeat_kv`` (HF's way) or ``enable_gqa``.
        moe_z_loss_weight: weight of the router z-loss (MegaBlocks' ``moe_zloss_weight``: the mean over layers of
            ``mean_t logsumexp(logits_t)^2``; ST-MoE used 0.001). 0: computed and logged, not trained on.
        moe_bias_balancing: aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the router
            probabilities for the top-k choice only, nudged toward balance after every optimizer step from the load
            of the global batch. Needs the ``dbrx_expert_load`` callback, which applies the updates.
        moe_bias_update_rate: how far one step moves an expert's bias (DeepSeek-V3's gamma, 0.001); 0 keeps a
            loaded bias fixed (it still steers the choice).
        compile: what ``torch.compile`` fuses: ``none``; ``attention`` (each block's norms, QKV clip, RoPE,
            attention and residual add: the elementwise work around the GEMMs); ``block`` (the whole block but the
            expert GEMMs, which stay our kernels: router, dispatch and combine too). Compiled once on the first
            step (a minute or so); the graph is shared by the blocks.
    """

    moe_backend: str = 'auto'
    moe_lb_loss_type: str = 'megablocks'
    moe_lb_loss_scope: str = 'global'
    expert_parallel_degree: int = 1
    data_parallel_replicate_degree: int = 1
    activation_checkpointing: str = 'block'
    activation_checkpointing_every: int = 1
    fused_cross_entropy: bool = False
    gqa_impl: str = 'auto'
    moe_z_loss_weight: float = 0.0
    moe_bias_balancing: bool = False
    moe_bias_update_rate: float = 0.001
    compile: str = 'none'

    def __post_init__(self) -> None:
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f'training.moe_backend ({self.moe_backend!r}) must be one of {list(MOE_BACKENDS)}')
        if self.moe_lb_loss_type not in LB_LOSS_TYPES:
            raise ValueError(
                f'training.moe_lb_loss_type ({self.moe_lb_loss_type!r}) must be one of {list(LB_LOSS_TYPES)}')
        if self.moe_lb_loss_scope not in LB_LOSS_SCOPES:
            raise ValueError(f'training.moe_lb_loss_scope ({self.moe_lb_loss_scope!r}) must be one of '
                             f'{list(LB_LOSS_SCOPES)}')
        _check_positive('training.', 'expert_parallel_degree', self.expert_parallel_degree)
        _check_positive('training.', 'data_parallel_replicate_degree', self.data_parallel_replicate_degree)
        if self.activation_checkpointing not in AC_TARGETS:
            raise ValueError(f'training.activation_checkpointing ({self.activation_checkpointing!r}) must be one of '
                             f'{list(AC_TARGETS)}')
        _check_positive('training.', 'activation_checkpointing_every', self.activation_checkpointing_every)
        if not isinstance(self.fused_cross_entropy, bool):
            raise ValueError(f'training.fused_cross_entropy ({self.fused_cross_entropy!r}) must be true or false')
        if self.gqa_impl not in GQA_IMPLS:
            raise ValueError(f'training.gqa_impl ({self.gqa_impl!r}) must be one of {list(GQA_IMPLS)}')
        if not _is_number(self.moe_z_loss_weight) or self.moe_z_loss_weight < 0:
            raise ValueError(f'training.moe_z_loss_weight ({self.moe_z_loss_weight!r}) must be a number >= 0')
        if not isinstance(self.moe_bias_balancing, bool):
            raise ValueError(f'training.moe_bias_balancing ({self.moe_bias_balancing!r}) must be true or false')
        if not _is_number(self.moe_bias_update_rate) or self.moe_bias_update_rate < 0:
            raise ValueError(f'training.moe_bias_update_rate ({self.moe_bias_update_rate!r}) must be a number >= 0')
        if self.compile not in COMPILE_TARGETS:
            raise ValueError(f'training.compile ({self.compile!r}) must be one of {list(COMPILE_TARGETS)}')

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]]) -> 'DbrxTrainingConfig':
        if isinstance(values, DbrxTrainingConfig):
            return values
        if values is not None and not isinstance(values, Mapping):
            raise ValueError(f'model.training ({values!r}) must be a mapping of training choices')
        return cls(**_reject_unknown(cls, dict(values or {}), 'model.training'))

    def check_model(self, cfg: DbrxConfig) -> None:
        """Rules that involve the architecture too."""
        e, ep = cfg.ffn_config.moe_num_experts, self.expert_parallel_degree
        if e % ep:
            raise ValueError(f'training.expert_parallel_degree ({ep}) must divide ffn_config.moe_num_experts ({e})')
