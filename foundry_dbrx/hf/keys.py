"""The key map: DBRX parameter names and shapes per config, the Composer / DCP prefixes, and the check that a
checkpoint holds exactly the config's parameters.

Our parameter names are transformers' ``DbrxForCausalLM`` names, so the map is the identity; it is still a checked
table (:data:`KEY_TABLE`): before any byte is written, every source key must be one the config expects, every
expected key must be present, and every shape must match, or the conversion stops with an error that lists all
three kinds of problem.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

from foundry_dbrx.config import DbrxConfig

__all__ = ['KEY_TABLE', 'COMPOSER_MODEL_PREFIX', 'DCP_STATE_MODEL', 'KeyMismatchError', 'expected_shapes',
           'check_keys', 'strip_wrappers', 'clean_names']

# ComposerDbrxCausalLM keeps DbrxForCausalLM as `.model`, so Composer's state['model'] keys carry this prefix.
COMPOSER_MODEL_PREFIX = 'model.'
# Where the sharded (torch.distributed.checkpoint) format keeps the ComposerModel's state: Composer saves
# {'state': {'model': ...}} and DCP flattens nested dicts with dots.
DCP_STATE_MODEL = 'state.model.'
# Infixes that wrappers put into parameter names (FSDP1, activation checkpointing, torch.compile); they are not part
# of the model's names, so every reader drops them before the key check.
_WRAPPER_INFIXES = ('_fsdp_wrapped_module.', '_checkpoint_wrapped_module.', '_orig_mod.')

# --------------------------------------------------------------------------------------------------------------------
# (name, shape from the config). HF key == our module key; Composer key == COMPOSER_MODEL_PREFIX + it.
# Order is transformers' parameter order, which is also the order of the exported shards.
# --------------------------------------------------------------------------------------------------------------------
ShapeFn = Callable[[DbrxConfig], tuple]


def _qkv_rows(c: DbrxConfig) -> int:
    return c.d_model + 2 * c.attn_config.kv_n_heads * c.head_dim


def _expert_rows(c: DbrxConfig) -> int:
    return c.ffn_config.moe_num_experts * c.ffn_config.ffn_hidden_size


KEY_TABLE: dict[str, tuple[tuple[str, ShapeFn], ...]] = {
    'head': (('transformer.wte.weight', lambda c: (c.vocab_size, c.d_model)),),
    # per block; {i} is the block index
    'block': (
        ('transformer.blocks.{i}.norm_attn_norm.norm_1.weight', lambda c: (c.d_model,)),
        ('transformer.blocks.{i}.norm_attn_norm.attn.Wqkv.weight', lambda c: (_qkv_rows(c), c.d_model)),
        ('transformer.blocks.{i}.norm_attn_norm.attn.out_proj.weight', lambda c: (c.d_model, c.d_model)),
        ('transformer.blocks.{i}.norm_attn_norm.norm_2.weight', lambda c: (c.d_model,)),
        ('transformer.blocks.{i}.ffn.router.layer.weight', lambda c: (c.ffn_config.moe_num_experts, c.d_model)),
        # fused experts [E*F, D]; w2 is used untransposed in both implementations, so nothing is transposed here
        ('transformer.blocks.{i}.ffn.experts.mlp.w1', lambda c: (_expert_rows(c), c.d_model)),
        ('transformer.blocks.{i}.ffn.experts.mlp.v1', lambda c: (_expert_rows(c), c.d_model)),
        ('transformer.blocks.{i}.ffn.experts.mlp.w2', lambda c: (_expert_rows(c), c.d_model)),
    ),
    'tail': (
        ('transformer.norm_f.weight', lambda c: (c.d_model,)),
        ('lm_head.weight', lambda c: (c.vocab_size, c.d_model)),
    ),
}


def expected_shapes(cfg: DbrxConfig) -> dict[str, tuple[int, ...]]:
    """HF key -> shape for a model of this config, in transformers' parameter order."""
    out = {name: fn(cfg) for name, fn in KEY_TABLE['head']}
    for i in range(cfg.n_layers):
        out.update((name.format(i=i), fn(cfg)) for name, fn in KEY_TABLE['block'])
    out.update((name, fn(cfg)) for name, fn in KEY_TABLE['tail'])
    return {k: tuple(v) for k, v in out.items()}


def strip_wrappers(key: str) -> str:
    """``key`` without the infixes that FSDP1, activation checkpointing and torch.compile add."""
    for infix in _WRAPPER_INFIXES:
        key = key.replace(infix, '')
    return key


def clean_names(keys: Iterable[str], where: str, clean: Callable[[str], str] = strip_wrappers) -> dict[str, str]:
    """clean name -> the key as the checkpoint spells it. Two keys that become one name (``lm_head.weight`` and
    ``_orig_mod.lm_head.weight``) are an error naming both: keeping either would silently drop the other."""
    out: dict[str, str] = {}
    clashes: list[str] = []
    for key in keys:
        name = clean(key)
        if name in out:
            clashes.append(f'{out[name]!r} and {key!r} are both {name!r}')
        else:
            out[name] = key
    if clashes:
        more = f' ... and {len(clashes) - 5} more' if len(clashes) > 5 else ''
        raise ValueError(f'{where}: {len(clashes)} parameter name(s) appear twice once wrapper prefixes '
                         f'({", ".join(_WRAPPER_INFIXES)}) are dropped: {"; ".join(clashes[:5])}{more}; '
                         'which copy is the model is ambiguous')
    return out


class KeyMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the config: lists unmapped keys, missing keys, shape mismatches."""

    def __init__(self, source: str, unmapped: list[str], missing: list[str],
                 mismatched: list[tuple[str, tuple, tuple]]):
        self.unmapped, self.missing, self.mismatched = unmapped, missing, mismatched

        def listed(items: list[str], limit: int = 20) -> str:
            more = f' ... and {len(items) - limit} more' if len(items) > limit else ''
            return ', '.join(items[:limit]) + more

        parts = [f'{source} does not match the model config:']
        if unmapped:
            parts.append(f'  {len(unmapped)} unmapped key(s) (not a DBRX parameter of this config): {listed(unmapped)}')
        if missing:
            parts.append(f'  {len(missing)} missing key(s): {listed(missing)}')
        if mismatched:
            parts.append(f'  {len(mismatched)} shape mismatch(es): ' + listed(
                [f'{k} has {list(got)}, config expects {list(want)}' for k, got, want in mismatched]))
        super().__init__('\n'.join(parts))


def check_keys(found: Mapping[str, Sequence[int]], cfg: DbrxConfig, source: str) -> None:
    """Raises :class:`KeyMismatchError` unless ``found`` (HF key -> shape) is exactly the config's key table."""
    want = expected_shapes(cfg)
    unmapped = sorted(k for k in found if k not in want)
    missing = [k for k in want if k not in found]
    mismatched = [(k, tuple(found[k]), want[k]) for k in want if k in found and tuple(found[k]) != want[k]]
    if unmapped or missing or mismatched:
        raise KeyMismatchError(source, unmapped, missing, mismatched)
