"""The config map: HF ``config.json`` <-> :class:`DbrxConfig`, which fields fix the weights (architecture) and
which are training choices, and where a config comes from (an HF folder, a config.json, a training YAML)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from foundry_dbrx.config import DbrxConfig
from foundry_dbrx.hf.files import HF_CONFIG

__all__ = ['HF_LAYER_NORM_EPS', 'load_hf_config', 'config_with_hf', 'read_config_source', 'hf_config_dict',
           'architecture_differences']

PathLike = Union[str, os.PathLike]

# Fields that fix the weights' shapes or the forward math: a YAML that sets one must agree with config.json. The rest
# (dropouts, jitter, loss weight and type, backend, max_seq_len, init std) are training choices the YAML may change.
_ARCH_FIELDS = {
    '': ('d_model', 'n_heads', 'n_layers', 'vocab_size', 'layer_norm_eps'),
    'attn_config': ('kv_n_heads', 'clip_qkv', 'rope_theta'),
    'ffn_config': ('ffn_hidden_size', 'moe_num_experts', 'moe_top_k', 'moe_normalize_expert_weights', 'ffn_act_fn'),
}
# transformers' DBRX builds its LayerNorms with the default eps; it has no config field for it.
HF_LAYER_NORM_EPS = 1e-5


def load_hf_config(hf_dir: PathLike) -> tuple[DbrxConfig, dict]:
    """(our config, the raw config.json dict) of an HF DBRX folder."""
    path = Path(hf_dir) / HF_CONFIG
    if not Path(hf_dir).is_dir():
        raise FileNotFoundError(f'{hf_dir}: no such folder (expected an HF DBRX folder: config.json and safetensors '
                                'weights)')
    if not path.is_file():
        raise FileNotFoundError(f'{hf_dir}: no {HF_CONFIG}; an HF DBRX folder has config.json and safetensors weights')
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    if not isinstance(raw, dict):
        raise ValueError(f'{path}: must hold a JSON object, not {type(raw).__name__}')
    if raw.get('model_type', 'dbrx') != 'dbrx':
        raise ValueError(f"{path}: model_type ({raw['model_type']!r}) must be 'dbrx'")
    try:
        return DbrxConfig.from_dict(raw), raw
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from e


def _hf_act_fn(value: Any) -> dict:
    return dict(value or {'name': 'silu'})  # HF's spelling of null: DBRX experts are SiLU GLUs


def _normalise(section: str, name: str, value: Any) -> Any:
    if section == 'ffn_config' and name == 'ffn_act_fn':
        return _hf_act_fn(value)
    return value


def architecture_differences(given: Mapping[str, Any], have: Mapping[str, Any], given_name: str,
                             have_name: str) -> list[str]:
    """One line per architecture field that ``given`` sets to something other than ``have``'s value (both HF-style
    config dicts; a field ``given`` leaves out is no difference)."""
    differences = []
    for section, names in _ARCH_FIELDS.items():
        ours = (given.get(section) or {}) if section else given
        theirs = (have.get(section) or {}) if section else have
        for name in names:
            if name in ours:
                a = _normalise(section, name, ours[name])
                b = _normalise(section, name, theirs.get(name))
                if a != b:
                    path = f'{section}.{name}' if section else name
                    differences.append(f'{path}: {given_name} has {a!r}, {have_name} has {b!r}')
    return differences


def config_with_hf(hf_dir: PathLike, overrides: Optional[Mapping[str, Any]] = None) -> DbrxConfig:
    """The config of the HF model in ``hf_dir``, with the training choices of ``overrides`` (a YAML ``model:``
    section) applied. An architecture field that ``overrides`` gives must equal config.json's, else ``ValueError``
    listing every difference."""
    hf_cfg, _ = load_hf_config(hf_dir)
    base = hf_cfg.to_dict()
    overrides = dict(overrides or {})
    differences = architecture_differences(overrides, base, 'YAML', f'{hf_dir}/{HF_CONFIG}')
    if differences:
        raise ValueError(f'model config disagrees with pretrained_hf_dir ({hf_dir}) on '
                         f'{len(differences)} field(s) that fix the weights or the math:\n  ' +
                         '\n  '.join(differences) + '\nRemove them from the YAML (config.json fills them in) or '
                         'make them equal.')
    merged = dict(base)
    for key, value in overrides.items():
        if key in ('attn_config', 'ffn_config'):
            merged[key] = {**base[key], **(value or {})}
        else:
            merged[key] = value
    return DbrxConfig.from_dict(merged)


# Keys of a YAML `model:` section that are ComposerDbrxCausalLM arguments, not DbrxConfig fields.
_COMPOSER_MODEL_KEYS = ('name', 'init_device', 'use_train_metrics', 'pretrained_hf_dir', 'tokenizer', 'training')


def read_config_source(path: PathLike) -> DbrxConfig:
    """A DBRX config from an HF folder, a ``config.json``, or a training YAML (its ``model:`` section)."""
    path = Path(path)
    if path.is_dir():
        return load_hf_config(path)[0]
    if not path.is_file():
        raise FileNotFoundError(f'config source {path}: no such file or folder')
    if path.suffix == '.json':
        try:
            return DbrxConfig.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f'{path}: not valid JSON ({e})') from None
        except ValueError as e:
            raise ValueError(f'{path}: {e}') from None
    if path.suffix in ('.yaml', '.yml'):
        from omegaconf import OmegaConf
        try:
            cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as e:  # omegaconf and yaml raise many kinds
            raise ValueError(f'{path}: cannot read the YAML: {type(e).__name__}: {e}') from None
        model = dict(cfg.get('model') or {}) if isinstance(cfg, dict) else {}
        if not model:
            raise ValueError(f'{path}: no model: section')
        if model.get('name', 'dbrx') != 'dbrx':
            raise ValueError(f"{path}: model.name ({model['name']!r}) must be 'dbrx'")
        hf_dir = model.get('pretrained_hf_dir')
        fields = {k: v for k, v in model.items() if k not in _COMPOSER_MODEL_KEYS}
        try:
            return config_with_hf(hf_dir, fields) if hf_dir else DbrxConfig.from_dict(fields)
        except ValueError as e:
            raise ValueError(f'{path}: {e}') from None
    raise ValueError(f'config source ({path}) must be an HF folder, a config.json or a training YAML')


def hf_config_dict(cfg: DbrxConfig, dtype: Optional[torch.dtype] = None, base: Optional[Mapping] = None) -> dict:
    """config.json for transformers' DbrxForCausalLM: ``base`` (the source config.json, if any) updated with ours.

    ``auto_map`` is dropped: the export loads with transformers' own DBRX class, no remote code.
    """
    if cfg.layer_norm_eps != HF_LAYER_NORM_EPS:
        raise ValueError(f'layer_norm_eps ({cfg.layer_norm_eps}) must be {HF_LAYER_NORM_EPS} to export to HF: '
                         "transformers' DBRX has no eps field and always uses that value")
    out = {k: v for k, v in (base or {}).items() if k not in ('auto_map', '_name_or_path')}
    ours = cfg.to_hf_dict()
    ours['ffn_config']['ffn_act_fn'] = _hf_act_fn(ours['ffn_config']['ffn_act_fn'])
    for section in ('attn_config', 'ffn_config'):
        ours[section] = {**(out.get(section) or {}), **ours[section]}
    # Training at a shorter max_seq_len (a YAML over pretrained_hf_dir) does not shrink the model's context.
    ours['max_seq_len'] = max(ours['max_seq_len'], int(out.get('max_seq_len') or 0))
    out.update(ours)
    if dtype is not None:
        out['torch_dtype'] = str(dtype).removeprefix('torch.')
    return out
