"""HF DBRX <-> foundry-dbrx: the key map, the config map, and conversions that hold one shard at a time.

Our parameter names are transformers' ``DbrxForCausalLM`` names, so the key map is the identity; it is still a
checked table (:data:`KEY_TABLE`): before any byte is written, every source key must be one the config expects,
every expected key must be present, and every shape must match, or the conversion stops with an error that lists
all three kinds of problem.

Formats
- HF: ``config.json``, ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards with
  ``model.safetensors.index.json``, plus tokenizer files and ``generation_config.json`` when present.
- Composer, monolithic: a ``torch.save`` file ``{'state': {'model': {'model.<HF key>': tensor}}, ...}``. The
  ``model.`` prefix is there because :class:`ComposerDbrxCausalLM` holds the net as ``.model``; a training YAML
  starts from it with ``load_path: <file>`` and ``load_weights_only: true``.
- Composer, sharded (input only): the ``torch.distributed.checkpoint`` folder (``.metadata``,
  ``__<rank>_0.distcp``) that FSDP runs with ``state_dict_type: sharded`` write; its model tensors are named
  ``state.model.model.<HF key>``.

Memory: HF -> Composer writes the ``.pt`` skeleton without data (``torch.serialization.skip_data``) and fills it one
HF shard at a time through a shared memory map that is dropped after each shard; Composer -> HF reads only the
tensors of the output shard being written (memory-mapped ``.pt``, or per-key reads of the sharded folder). Peak
memory is therefore a small multiple of the largest shard, not the model (tests/test_hf_convert.py measures it).
Outputs are written under a temporary name and renamed when complete.

The routers' balancing bias (``transformer.blocks.{i}.ffn.router.expert_bias``, a buffer of aux-loss-free balancing)
has no place in HF's DBRX: an export writes it into config.json as ``foundry_dbrx_router_bias`` (one list of E floats
per layer; left out when every bias is zero), which transformers keeps as a config attribute and ignores, so the
safetensors hold exactly HF's keys and HF's forward routes without it. Every way back (HF -> Composer,
``pretrained_hf_dir``) restores it bit for bit (fp32 values survive JSON's float64 exactly).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import mmap
import os
import pickle
import re
import shutil
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from foundry_dbrx.config import ROUTER_BIAS_HF_KEY, DbrxConfig

__all__ = ['KEY_TABLE', 'COMPOSER_MODEL_PREFIX', 'KeyMismatchError', 'expected_shapes', 'check_keys',
           'hf_to_composer', 'composer_to_hf', 'save_hf_checkpoint', 'load_hf_config', 'config_with_hf',
           'read_config_source', 'load_hf_weights', 'hf_param_init_fn', 'load_pretrained_hf',
           'gather_full_state_dict', 'unwrap_ddp', 'parse_size', 'add_arguments', 'run', 'ROUTER_BIAS_KEY',
           'split_router_bias', 'router_bias_from_state', 'router_bias_from_hf_config', 'set_router_bias']

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

HF_CONFIG = 'config.json'
HF_SINGLE_FILE = 'model.safetensors'
HF_INDEX = 'model.safetensors.index.json'
HF_GENERATION_CONFIG = 'generation_config.json'
# ComposerDbrxCausalLM keeps DbrxForCausalLM as `.model`, so Composer's state['model'] keys carry this prefix.
COMPOSER_MODEL_PREFIX = 'model.'
# Where the sharded (torch.distributed.checkpoint) format keeps the model: Composer saves {'state': {'model': ...}}
# and DCP flattens nested dicts with dots.
DCP_STATE_MODEL = 'state.model.'  # where Composer's sharded checkpoints keep the ComposerModel's state
# Our own top-level key in the .pt: the source config.json and the small HF files, so that HF -> Composer -> HF
# gives back the tokenizer and config without extra flags. Composer reads only 'state' and 'rng' and ignores it.
CARRY_KEY = 'foundry_dbrx'
# Non-weight files of an HF folder that travel with the weights (tokenizer, generation config, model card ...).
_CARRY_MAX_BYTES = 64 * 2**20
_WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.ckpt', '.h5', '.msgpack', '.gguf')
# Infixes that wrappers put into parameter names (FSDP1, activation checkpointing, torch.compile); they are not part
# of the model's names, so every reader drops them before the key check.
_WRAPPER_INFIXES = ('_fsdp_wrapped_module.', '_checkpoint_wrapped_module.', '_orig_mod.')

_SAFETENSORS_DTYPES = {
    'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
    'BOOL': torch.bool,
}
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

# --------------------------------------------------------------------------------------------------------------------
# The key map. (name, shape from the config). HF key == our module key; Composer key == COMPOSER_MODEL_PREFIX + it.
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


def _strip_wrappers(key: str) -> str:
    for infix in _WRAPPER_INFIXES:
        key = key.replace(infix, '')
    return key


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


ROUTER_BIAS_KEY = 'transformer.blocks.{i}.ffn.router.expert_bias'
_ROUTER_BIAS_RE = re.compile(r'transformer\.blocks\.(\d+)\.ffn\.router\.expert_bias')


def split_router_bias(keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """(weight keys, router-bias keys) of a state dict's keys."""
    keys = list(keys)
    bias = [k for k in keys if _ROUTER_BIAS_RE.fullmatch(k)]
    return [k for k in keys if k not in set(bias)], bias


def router_bias_from_state(tensors: Mapping[str, torch.Tensor], cfg: DbrxConfig, source: str) -> torch.Tensor:
    """The ``[n_layers, E]`` fp32 bias of every layer's router from state-dict tensors (all layers or an error)."""
    want = [ROUTER_BIAS_KEY.format(i=i) for i in range(cfg.n_layers)]
    e = cfg.ffn_config.moe_num_experts
    problems = [k for k in tensors if k not in want] + [k for k in want if k not in tensors]
    problems += [f'{k} has {list(tensors[k].shape)}, config expects [{e}]' for k in want
                 if k in tensors and tuple(tensors[k].shape) != (e,)]
    if problems:
        raise ValueError(f'{source}: router bias keys do not match the config: {", ".join(problems[:20])}')
    return torch.stack([tensors[k].detach().to('cpu', torch.float32) for k in want])


def router_bias_from_hf_config(raw: Mapping[str, Any], cfg: DbrxConfig, source: str) -> Optional[torch.Tensor]:
    """The ``[n_layers, E]`` bias an export carried in config.json, or None where it carries none."""
    value = raw.get(ROUTER_BIAS_HF_KEY)
    if value is None:
        return None
    e, n = cfg.ffn_config.moe_num_experts, cfg.n_layers
    ok = (isinstance(value, list) and len(value) == n and all(isinstance(row, list) and len(row) == e and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row) for row in value))
    if not ok:
        raise ValueError(f'{source}: {ROUTER_BIAS_HF_KEY} must be {n} lists (n_layers) of {e} finite numbers '
                         '(moe_num_experts)')
    return torch.tensor(value, dtype=torch.float32)


@torch.no_grad()
def set_router_bias(model: nn.Module, bias_LE: Optional[torch.Tensor]) -> None:
    """Gives each router of a ``DbrxForCausalLM`` its row of ``bias_LE`` (zeros when None)."""
    from foundry_dbrx.moe.router import DbrxRouter
    routers = [m for m in model.modules() if isinstance(m, DbrxRouter)]
    for i, router in enumerate(routers):
        if bias_LE is None:
            router.reset_expert_bias()
        else:
            router.expert_bias.copy_(bias_LE[i])


# --------------------------------------------------------------------------------------------------------------------
# The config map
# --------------------------------------------------------------------------------------------------------------------
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
    if not path.is_file():
        raise FileNotFoundError(f'{hf_dir}: no {HF_CONFIG}; an HF DBRX folder has config.json and safetensors weights')
    raw = json.loads(path.read_text())
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


def config_with_hf(hf_dir: PathLike, overrides: Optional[Mapping[str, Any]] = None) -> DbrxConfig:
    """The config of the HF model in ``hf_dir``, with the training choices of ``overrides`` (a YAML ``model:``
    section) applied. An architecture field that ``overrides`` gives must equal config.json's, else ``ValueError``
    listing every difference."""
    hf_cfg, _ = load_hf_config(hf_dir)
    base = hf_cfg.to_dict()
    overrides = dict(overrides or {})
    differences = []
    for section, names in _ARCH_FIELDS.items():
        given = overrides.get(section, {}) if section else overrides
        have = base[section] if section else base
        for name in names:
            if name in (given or {}):
                ours, theirs = _normalise(section, name, given[name]), _normalise(section, name, have[name])
                if ours != theirs:
                    path = f'{section}.{name}' if section else name
                    differences.append(f'{path}: YAML has {ours!r}, {hf_dir}/{HF_CONFIG} has {theirs!r}')
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
    if path.suffix == '.json':
        return DbrxConfig.from_dict(json.loads(path.read_text()))
    if path.suffix in ('.yaml', '.yml'):
        from omegaconf import OmegaConf
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        model = dict(cfg.get('model') or {})
        if not model:
            raise ValueError(f'{path}: no model: section')
        if model.get('name', 'dbrx') != 'dbrx':
            raise ValueError(f"{path}: model.name ({model['name']!r}) must be 'dbrx'")
        hf_dir = model.get('pretrained_hf_dir')
        fields = {k: v for k, v in model.items() if k not in _COMPOSER_MODEL_KEYS}
        return config_with_hf(hf_dir, fields) if hf_dir else DbrxConfig.from_dict(fields)
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


# --------------------------------------------------------------------------------------------------------------------
# Sources: where tensors come from. Each knows every key's shape and dtype without loading data, and loads a subset.
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    dtype: torch.dtype
    file: Optional[str] = None  # the safetensors shard that holds it (HF sources)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class _HFSource:
    """An HF folder's safetensors: specs from the headers; tensors read per shard file."""

    def __init__(self, hf_dir: PathLike):
        from safetensors import safe_open
        self.dir = Path(hf_dir)
        index_path, single = self.dir / HF_INDEX, self.dir / HF_SINGLE_FILE
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text()).get('weight_map')
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f'{index_path}: weight_map must be a non-empty {{key: file}} mapping')
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = None, [HF_SINGLE_FILE]
        else:
            raise FileNotFoundError(f'{hf_dir}: neither {HF_INDEX} nor {HF_SINGLE_FILE}; only safetensors weights '
                                    'are read')
        self.specs: dict[str, TensorSpec] = {}
        self._raw_names: dict[str, str] = {}  # our key -> the key as the file spells it
        self._layouts: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}  # file -> _safetensors_layout(file)
        disagreements = []
        for name in files:
            with safe_open(self.dir / name, framework='pt') as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise ValueError(f'{name}: {key} has dtype {sl.get_dtype()}, not one of '
                                         f'{sorted(_SAFETENSORS_DTYPES)}')
                    if weight_map is not None and weight_map.get(key) != name:
                        disagreements.append(f'{key} is in {name}, index says {weight_map.get(key)}')
                    self.specs[_strip_wrappers(key)] = TensorSpec(tuple(sl.get_shape()), dtype, name)
                    self._raw_names[_strip_wrappers(key)] = key
        if weight_map is not None:
            disagreements += [f'{k} listed in the index but not in {f}' for k, f in weight_map.items()
                              if _strip_wrappers(k) not in self.specs]
        if disagreements:
            raise ValueError(f'{index_path} disagrees with the shard files: ' + '; '.join(disagreements[:20]))

    def by_file(self, keys: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(self.specs[k].file, []).append(k)
        yield from groups.items()

    def iter_tensors(self, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (key, tensor) one at a time, opening each shard file once."""
        from safetensors import safe_open
        for name, group in self.by_file(keys):
            with safe_open(self.dir / name, framework='pt') as f:
                for k in group:
                    yield k, f.get_tensor(self._raw_names[k])

    def load(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(self.iter_tensors(keys))

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Reads one tensor straight from its file into ``out`` (no intermediate copy) when dtypes agree."""
        spec = self.specs[key]
        if out.dtype != spec.dtype or tuple(out.shape) != spec.shape or not out.is_contiguous():
            out.copy_(next(self.iter_tensors([key]))[1])
            return
        path = self.dir / spec.file
        if spec.file not in self._layouts:
            self._layouts[spec.file] = _safetensors_layout(path)
        data_start, offsets = self._layouts[spec.file]
        begin, end = offsets[self._raw_names[key]]
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        if len(buf) != end - begin:
            raise ValueError(f'{path}: {key} spans {end - begin} bytes, its shape and dtype need {len(buf)}')
        # safetensors data is raw little-endian bytes, torch's CPU layout on every platform torch runs on.
        with open(path, 'rb', buffering=0) as f:
            f.seek(data_start + begin)
            done = 0
            while done < len(buf):
                n = f.readinto(buf[done:])
                if not n:
                    raise ValueError(f'{path}: file ends inside {key}')
                done += n


def _safetensors_layout(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(where the data starts, key -> (begin, end) byte offsets in the data) from a safetensors header: 8 bytes of
    little-endian header length, then the JSON header."""
    with open(path, 'rb') as f:
        (n,) = struct.unpack('<Q', f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, {k: tuple(v['data_offsets']) for k, v in header.items() if k != '__metadata__'}


def _torch_load(path: Path, mmap_: bool = True) -> Any:
    try:
        return torch.load(path, map_location='cpu', mmap=mmap_, weights_only=True)
    except pickle.UnpicklingError:
        # Composer training checkpoints pickle Composer objects (Timestamp, ...), which weights_only refuses; they are
        # loaded the way Composer itself loads them. Only convert checkpoints you trust.
        return torch.load(path, map_location='cpu', mmap=mmap_, weights_only=False)


def _composer_model_keys(state_model: Mapping[str, Any], where: str) -> dict[str, str]:
    """HF key -> Composer key for every entry of a Composer ``state['model']``."""
    out, unprefixed = {}, []
    for key in state_model:
        clean = _strip_wrappers(key)
        if clean.startswith('module.'):  # pre-0.6 Composer DDP checkpoints
            clean = clean[len('module.'):]
        if not clean.startswith(COMPOSER_MODEL_PREFIX):
            unprefixed.append(key)
            continue
        out[clean[len(COMPOSER_MODEL_PREFIX):]] = key
    if unprefixed:
        raise KeyMismatchError(f'{where} (Composer keys must start with {COMPOSER_MODEL_PREFIX!r}, '
                               'as ComposerDbrxCausalLM holds the net as .model)', unprefixed, [], [])
    return out


class _TorchSaveSource:
    """A monolithic Composer checkpoint, memory-mapped: only the tensors being copied become resident."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            raise ValueError(f'{path}: not an uncompressed torch.save file; decompress .tar / .lz4 / .gz Composer '
                             'checkpoints first')
        ckpt = _torch_load(self.path)
        model = (ckpt.get('state') or {}).get('model') if isinstance(ckpt, dict) else None
        if not isinstance(model, Mapping):
            raise ValueError(f"{path}: no state['model'] dict; top-level keys are "
                             f"{sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__}")
        self.names = _composer_model_keys(model, str(path))
        self.specs = {k: TensorSpec(tuple(model[c].shape), model[c].dtype) for k, c in self.names.items()}
        self.carried = ckpt.get(CARRY_KEY) or {}
        del ckpt, model

    def load(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        # A fresh mapping per call: tensors read now are released with it, so residency never builds up.
        model = _torch_load(self.path)['state']['model']
        return {k: model[self.names[k]] for k in keys}


class _DCPSource:
    """A Composer sharded checkpoint folder (torch.distributed.checkpoint), read key by key in one process."""

    def __init__(self, path: PathLike):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        self.path = Path(path)
        self._reader = lambda: dcp.FileSystemReader(str(self.path))
        metadata = self._reader().read_metadata()
        tensors = {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        model_keys = {k: v for k, v in tensors.items() if k.startswith(DCP_STATE_MODEL)}
        if not model_keys:
            raise ValueError(f"{path}: no tensors under state.model in this sharded checkpoint; found prefixes "
                             f"{sorted({k.split('.')[0] for k in metadata.state_dict_metadata})}")
        self.names = _composer_model_keys({k[len(DCP_STATE_MODEL):]: None for k in model_keys}, str(path))
        self.specs = {}
        for hf_key, composer_key in self.names.items():
            md = model_keys[DCP_STATE_MODEL + composer_key]
            self.specs[hf_key] = TensorSpec(tuple(md.size), md.properties.dtype)
        self.carried = {}

    def load(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp
        wanted = {self.names[k]: torch.empty(self.specs[k].shape, dtype=self.specs[k].dtype) for k in keys}
        # Nested as Composer saved it; DCP flattens it to the same dotted names and fills only these tensors.
        with warnings_suppressed():
            dcp.load({'state': {'model': wanted}}, storage_reader=self._reader(), no_dist=True)
        return {k: wanted[self.names[k]] for k in keys}


class _DictSource:
    """An in-memory state dict (the training callback's gathered weights), HF key names."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self.tensors = {_strip_wrappers(k): v for k, v in state_dict.items()}
        self.specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in self.tensors.items()}
        self.carried = {}

    def load(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        return {k: self.tensors[k] for k in keys}


@contextlib.contextmanager
def warnings_suppressed():
    # DCP warns that no process group is initialised; one process reading a checkpoint is exactly the intent here.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


def _open_composer_source(ckpt: PathLike):
    path = Path(ckpt)
    if path.is_dir():
        if not (path / '.metadata').is_file():
            raise FileNotFoundError(f'{ckpt}: a folder, but not a Composer sharded checkpoint (no .metadata)')
        return _DCPSource(path)
    if not path.is_file():
        raise FileNotFoundError(f'{ckpt}: no such checkpoint file or folder')
    return _TorchSaveSource(path)


# --------------------------------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_output(out: Path, overwrite: bool, is_dir: bool) -> Iterator[Path]:
    """Yields a temporary sibling of ``out``; renames it to ``out`` only when the block completes, else removes it.
    A reader never sees a half-written ``out``."""
    if out.exists() and not overwrite:
        raise FileExistsError(f'{out} exists; pass overwrite=True (--overwrite) to replace it')
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f'.{out.name}.partial-{os.getpid()}'
    _remove(tmp)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        old = out.parent / f'.{out.name}.old-{os.getpid()}'
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        _remove(old)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def parse_size(size: Union[int, str]) -> int:
    """Bytes from ``5GB`` (10^9, as transformers counts), ``512MiB`` (2^20), ``100KB`` or a plain int."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*', str(size), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f'shard_size ({size!r}) must be a byte count such as 5GB, 500MB or 2GiB')
        unit = (m.group(2) or 'B').upper()
        scale = {'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12,
                 'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40}[unit]
        value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ValueError(f'shard_size ({size!r}) must be positive')
    return value


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit='B', unit_scale=True, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def _carry_files(folder: Path) -> dict[str, bytes]:
    """The small non-weight files of an HF folder (tokenizer, generation config, model card), except config.json."""
    out = {}
    for p in sorted(folder.iterdir()):
        if (not p.is_file() or p.name in (HF_CONFIG, HF_INDEX) or p.name.startswith('.')
                or p.name.endswith(_WEIGHT_SUFFIXES)):
            continue
        if p.stat().st_size > _CARRY_MAX_BYTES:
            log.warning('not carrying %s (%d bytes > %d)', p, p.stat().st_size, _CARRY_MAX_BYTES)
            continue
        out[p.name] = p.read_bytes()
    return out


# --------------------------------------------------------------------------------------------------------------------
# HF -> Composer
# --------------------------------------------------------------------------------------------------------------------
def hf_to_composer(hf_dir: PathLike, out_path: PathLike, *, dtype: Optional[torch.dtype] = None,
                   overwrite: bool = False, progress: bool = False) -> Path:
    """Converts an HF DBRX folder into a Composer checkpoint (``.pt``) that a training YAML loads with
    ``load_path`` and ``load_weights_only: true``.

    Tensors keep their dtype unless ``dtype`` is given. config.json and the folder's small files (tokenizer,
    generation config) travel inside the checkpoint, so :func:`composer_to_hf` can restore them. Holds about one
    HF shard in memory at a time.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if out_path.suffix != '.pt':
        raise ValueError(f'out_path ({out_path}) must end in .pt (a Composer monolithic checkpoint)')
    cfg, raw_config = load_hf_config(hf_dir)
    source = _HFSource(hf_dir)
    check_keys({k: s.shape for k, s in source.specs.items()}, cfg, f'{hf_dir}')
    order = list(expected_shapes(cfg))
    bias_LE = router_bias_from_hf_config(raw_config, cfg, str(hf_dir / HF_CONFIG))
    carried = {'hf_config': raw_config, 'hf_files': _carry_files(hf_dir)}
    total = sum(source.specs[k].nbytes for k in order)
    with _atomic_output(out_path, overwrite, is_dir=False) as tmp:
        # 1. The skeleton: the whole pickled structure, tensor bytes left as holes. torch.empty reserves address
        #    space only; skip_data never reads it, so nothing becomes resident.
        skeleton = {COMPOSER_MODEL_PREFIX + k: torch.empty(source.specs[k].shape,
                                                           dtype=dtype or source.specs[k].dtype) for k in order}
        if bias_LE is not None:  # the routers' balancing bias, which the export carried in config.json
            skeleton.update({COMPOSER_MODEL_PREFIX + ROUTER_BIAS_KEY.format(i=i): torch.empty(bias_LE.shape[1])
                             for i in range(cfg.n_layers)})
        with torch.serialization.skip_data():
            torch.save({'state': {'model': skeleton}, CARRY_KEY: carried}, tmp)
        del skeleton
        # 2. Fill the holes one HF shard at a time through a shared mapping of the file, dropped after each shard
        #    so that its pages leave this process.
        with _progress(total, f'{hf_dir.name} -> {out_path.name}', progress) as bar:
            for name, keys in source.by_file(order):
                with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
                    target = torch.load(tmp, mmap=True, weights_only=True)['state']['model']
                for key in keys:
                    source.read_into(key, target[COMPOSER_MODEL_PREFIX + key])
                    bar.update(source.specs[key].nbytes)
                del target
        if bias_LE is not None:
            with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
                target = torch.load(tmp, mmap=True, weights_only=True)['state']['model']
            for i in range(cfg.n_layers):
                target[COMPOSER_MODEL_PREFIX + ROUTER_BIAS_KEY.format(i=i)].copy_(bias_LE[i])
            del target
        # 3. skip_data wrote the zip's CRC-32s for the empty holes; correct them so zip tools accept the file.
        _fix_zip_crcs(tmp)
    log.info('wrote %s (%d tensors, %.1f MB)', out_path, len(order), total / 1e6)
    return out_path


def _fix_zip_crcs(path: Path, chunk: int = 2**20) -> None:
    """Recomputes each record's CRC-32 and writes it where zip readers look: the central directory and the data
    descriptor (torch's writer sets flag bit 3 and leaves the local header's CRC at zero)."""
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        start_dir = zf.start_dir
    buf = memoryview(bytearray(chunk))  # one reused buffer: the pass adds no memory that grows with the model
    with open(path, 'r+b', buffering=0) as f:
        central = start_dir
        for info in infos:
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack('<HH', local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            crc, left = 0, info.compress_size
            while left:
                n = f.readinto(buf[:min(chunk, left)])
                if not n:
                    raise ValueError(f'{path}: zip record {info.filename} is truncated')
                crc, left = zlib.crc32(buf[:n], crc), left - n
            descriptor = f.tell()
            if info.flag_bits & 0x08:
                if f.read(4) != b'PK\x07\x08':
                    f.seek(descriptor)  # no signature (it is optional): the CRC comes first
                f.write(struct.pack('<I', crc))
            else:
                f.seek(info.header_offset + 14)
                f.write(struct.pack('<I', crc))
            # central directory entry: fixed 46 bytes, CRC at offset 16, then name, extra and comment
            f.seek(central)
            entry = f.read(46)
            if entry[:4] != b'PK\x01\x02':
                raise ValueError(f'{path}: unexpected zip central directory layout at {central}')
            f.seek(central + 16)
            f.write(struct.pack('<I', crc))
            n, x, c = struct.unpack('<HHH', entry[28:34])
            central += 46 + n + x + c
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------------------------
# Composer -> HF
# --------------------------------------------------------------------------------------------------------------------
def _plan_shards(keys: Sequence[str], specs: Mapping[str, TensorSpec], shard_size: int,
                 dtype: Optional[torch.dtype]) -> list[list[str]]:
    """Greedy, in key order, as transformers shards: a tensor larger than shard_size gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for k in keys:
        n = TensorSpec(specs[k].shape, dtype or specs[k].dtype).nbytes
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _write_hf(source, cfg: DbrxConfig, out_dir: Path, *, shard_size: Union[int, str], dtype: Optional[torch.dtype],
              overwrite: bool, progress: bool, base_config: Optional[Mapping] = None,
              files: Optional[Mapping[str, bytes]] = None, tokenizer: Any = None, desc: str = '') -> Path:
    from safetensors.torch import save_file
    weight_keys, bias_keys = split_router_bias(source.specs)
    check_keys({k: source.specs[k].shape for k in weight_keys}, cfg, desc or 'checkpoint')
    bias_LE = router_bias_from_state(source.load(bias_keys), cfg, desc or 'checkpoint') if bias_keys else None
    order = list(expected_shapes(cfg))
    shards = _plan_shards(order, source.specs, parse_size(shard_size), dtype)
    names = ([HF_SINGLE_FILE] if len(shards) == 1 else
             [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
    dtypes = {dtype or source.specs[k].dtype for k in order}
    total = sum(TensorSpec(source.specs[k].shape, dtype or source.specs[k].dtype).nbytes for k in order)
    with _atomic_output(out_dir, overwrite, is_dir=True) as tmp:
        weight_map = {}
        with _progress(total, desc or f'-> {out_dir.name}', progress) as bar:
            for name, keys in zip(names, shards):
                tensors = source.load(keys)
                for k in keys:
                    t = tensors[k]
                    if dtype is not None and t.dtype != dtype:
                        t = t.to(dtype)
                    tensors[k] = t.contiguous()
                    weight_map[k] = name
                save_file(tensors, tmp / name, metadata={'format': 'pt'})  # transformers requires format=pt
                bar.update(sum(t.nbytes for t in tensors.values()))
                del tensors
        if len(shards) > 1:
            index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
            (tmp / HF_INDEX).write_text(json.dumps(index, indent=2) + '\n')
        for fname, data in (files or {}).items():
            (tmp / fname).write_bytes(data)
        if tokenizer is not None and hasattr(tokenizer, 'save_pretrained'):
            tokenizer.save_pretrained(str(tmp))
        if not (tmp / HF_GENERATION_CONFIG).exists() and tokenizer is not None:
            gen = {k: getattr(tokenizer, k, None) for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')}
            gen = {k: v for k, v in gen.items() if v is not None}
            if gen:
                (tmp / HF_GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + '\n')
        saved_dtype = dtypes.pop() if len(dtypes) == 1 else None
        config = hf_config_dict(cfg, saved_dtype, base_config)
        if bias_LE is not None:  # the state's bias is the truth; all zeros is HF's routing, written as nothing
            config.pop(ROUTER_BIAS_HF_KEY, None)
            if bias_LE.any():
                config[ROUTER_BIAS_HF_KEY] = bias_LE.tolist()
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
    log.info('wrote %s (%d shard(s), %.1f MB)', out_dir, len(shards), total / 1e6)
    return out_dir


def composer_to_hf(ckpt: PathLike, out_dir: PathLike, *, config: Union[None, PathLike, DbrxConfig] = None,
                   shard_size: Union[int, str] = '5GB', dtype: Optional[torch.dtype] = None,
                   tokenizer_dir: Optional[PathLike] = None, overwrite: bool = False,
                   progress: bool = False) -> Path:
    """Converts a Composer checkpoint (monolithic ``.pt`` or an FSDP sharded folder) into an HF DBRX folder that
    ``transformers.DbrxForCausalLM.from_pretrained`` loads with no remote code.

    ``config``: a :class:`DbrxConfig`, an HF folder / config.json, or the training YAML; optional for checkpoints
    written by :func:`hf_to_composer`, which carry their config.json. ``tokenizer_dir``: an HF folder whose
    tokenizer and generation files are copied (else those carried by the checkpoint, if any). Holds about one
    output shard in memory at a time.
    """
    source = _open_composer_source(ckpt)
    carried = source.carried
    base_config = carried.get('hf_config')
    if isinstance(config, DbrxConfig):
        cfg = config
    elif config is not None:
        cfg = read_config_source(config)
    elif base_config is not None:
        cfg = DbrxConfig.from_dict(base_config)
    else:
        raise ValueError(f'{ckpt} carries no model config: pass config= (--config): the training YAML, an HF '
                         'config.json or an HF folder')
    files = dict(carried.get('hf_files') or {})
    if tokenizer_dir is not None:
        files = _carry_files(Path(tokenizer_dir))
    return _write_hf(source, cfg, Path(out_dir), shard_size=shard_size, dtype=dtype, overwrite=overwrite,
                     progress=progress, base_config=base_config, files=files,
                     desc=f'{Path(ckpt).name} -> {Path(out_dir).name}')


def save_hf_checkpoint(state_dict: Mapping[str, torch.Tensor], cfg: DbrxConfig, out_dir: PathLike, *,
                       shard_size: Union[int, str] = '5GB', dtype: Optional[torch.dtype] = None,
                       tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Writes an in-memory DBRX state dict (HF key names) as an HF folder, with ``tokenizer.save_pretrained``."""
    return _write_hf(_DictSource(state_dict), cfg, Path(out_dir), shard_size=shard_size, dtype=dtype,
                     overwrite=overwrite, progress=False, tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------------------------------
# HF weights straight into a model (ComposerDbrxCausalLM(pretrained_hf_dir=...))
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def load_hf_weights(model: nn.Module, hf_dir: PathLike) -> None:
    """Copies an HF DBRX checkpoint into a materialised ``DbrxForCausalLM``, one tensor at a time, after checking
    every key and shape; the routers' bias comes from config.json (zeros where it carries none)."""
    source = _HFSource(hf_dir)
    params = dict(model.named_parameters())
    check_keys({k: s.shape for k, s in source.specs.items()}, model.config, str(hf_dir))
    bias_LE = _hf_router_bias(model, hf_dir)
    for key, tensor in source.iter_tensors(list(params)):
        params[key].copy_(tensor)
    set_router_bias(model, bias_LE)


def _hf_router_bias(model: nn.Module, hf_dir: PathLike) -> Optional[torch.Tensor]:
    raw = json.loads((Path(hf_dir) / HF_CONFIG).read_text())
    return router_bias_from_hf_config(raw, model.config, str(Path(hf_dir) / HF_CONFIG))


def hf_param_init_fn(model: nn.Module, hf_dir: PathLike) -> Callable[[nn.Module], None]:
    """A ``param_init_fn`` for a ``DbrxForCausalLM`` built on the meta device: when FSDP materialises a module, its
    own parameters are read from the HF shards instead of being initialised randomly (the keys are checked now),
    and a router's bias from config.json."""
    from foundry_dbrx.moe.router import DbrxRouter
    source = _HFSource(hf_dir)
    check_keys({k: s.shape for k, s in source.specs.items()}, model.config, str(hf_dir))
    bias_LE = _hf_router_bias(model, hf_dir)
    owner = {id(m): prefix for prefix, m in model.named_modules()}
    layer_of_router = {id(m): i for i, m in enumerate(m for m in model.modules() if isinstance(m, DbrxRouter))}

    @torch.no_grad()
    def init(module: nn.Module) -> None:
        from foundry_dbrx.model import assign_full
        prefix = owner[id(module)]
        params = {(f'{prefix}.{n}' if prefix else n): p for n, p in module.named_parameters(recurse=False)}
        for key, tensor in source.iter_tensors(list(params)):
            assign_full(params[key], tensor.to(_local_device(params[key])))
        if isinstance(module, DbrxRouter):
            if bias_LE is None:
                module.reset_expert_bias()
            else:
                module.expert_bias.copy_(bias_LE[layer_of_router[id(module)]])

    return init


def _local_device(param: torch.Tensor) -> torch.device:
    return param.to_local().device if hasattr(param, 'to_local') else param.device


def load_pretrained_hf(model: nn.Module, hf_dir: PathLike) -> None:
    """Gives a ``DbrxForCausalLM`` the weights of an HF DBRX folder: copied now if the model is materialised; if it
    is on the meta device, its ``param_init_fn`` (which Composer's FSDP calls per module) reads them instead."""
    if any(p.is_meta for p in model.parameters()):
        model.param_init_fn = hf_param_init_fn(model, hf_dir)
        log.info('weights will be read from %s as FSDP materialises each module', hf_dir)
    else:
        load_hf_weights(model, hf_dir)
        log.info('loaded weights from %s', hf_dir)


# --------------------------------------------------------------------------------------------------------------------
# Full weights of a (possibly FSDP-sharded) training model, for dbrx_hf_checkpointer
# --------------------------------------------------------------------------------------------------------------------
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
    # Clone to CPU: the export must not alias live parameters that the next optimizer step changes.
    return {_strip_wrappers(k).removeprefix(COMPOSER_MODEL_PREFIX): v.detach().to('cpu', copy=True)
            for k, v in state_dict.items()}


# --------------------------------------------------------------------------------------------------------------------
# CLI: foundry-dbrx convert {hf-to-composer,composer-to-hf}
# --------------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='direction', required=True, metavar='DIRECTION')
    p = sub.add_parser('hf-to-composer', help='HF DBRX folder -> Composer checkpoint (.pt) for load_path',
                       description='HF DBRX folder -> Composer checkpoint (.pt) for load_path + load_weights_only')
    p.add_argument('hf_dir', metavar='HF_DIR')
    p.add_argument('out', metavar='OUT', help='the .pt file to write')
    p.add_argument('--dtype', choices=sorted(DTYPES), help='cast the weights (default: keep)')
    p.add_argument('--overwrite', action='store_true', help='replace OUT if it exists')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    p = sub.add_parser('composer-to-hf', help='Composer checkpoint (.pt or sharded folder) -> HF DBRX folder',
                       description='Composer checkpoint (.pt or FSDP sharded folder) -> HF DBRX folder')
    p.add_argument('ckpt', metavar='CKPT')
    p.add_argument('out_dir', metavar='OUT_DIR')
    p.add_argument('--config', help='training YAML, HF config.json or HF folder with the model config '
                                    '(not needed for checkpoints made by hf-to-composer)')
    p.add_argument('--tokenizer-dir', help='HF folder whose tokenizer / generation files to copy')
    p.add_argument('--shard-size', default='5GB', help='largest safetensors shard (default 5GB)')
    p.add_argument('--dtype', choices=sorted(DTYPES), help='cast the weights (default: keep)')
    p.add_argument('--overwrite', action='store_true', help='replace OUT_DIR if it exists')
    p.add_argument('--quiet', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.direction == 'hf-to-composer':
            out = hf_to_composer(args.hf_dir, args.out, dtype=dtype, overwrite=args.overwrite,
                                 progress=not args.quiet)
            print(f'Composer checkpoint: {out}\n  start a run from it with  load_path: {out}  and  '
                  'load_weights_only: true')
        else:
            out = composer_to_hf(args.ckpt, args.out_dir, config=args.config, shard_size=args.shard_size,
                                 dtype=dtype, tokenizer_dir=args.tokenizer_dir, overwrite=args.overwrite,
                                 progress=not args.quiet)
            print(f'HF DBRX folder: {out}\n  load it with  transformers.DbrxForCausalLM.from_pretrained({str(out)!r})')
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'foundry-dbrx convert: error: {e}', file=sys.stderr)
        return 1
    return 0
