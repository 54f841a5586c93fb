"""Readers of each checkpoint format. Each knows every key's shape and dtype without loading data (``specs``), and
loads a subset of tensors on demand (``load``), so conversions hold one shard at a time.

- :class:`HFSource`: an HF folder's safetensors (``model.safetensors``, or shards with
  ``model.safetensors.index.json``).
- :class:`TorchSaveSource`: a monolithic Composer checkpoint, a ``torch.save`` file
  ``{'state': {'model': {'model.<HF key>': tensor}}, ...}``, memory-mapped. The ``model.`` prefix is there because
  ``ComposerDbrxCausalLM`` holds the net as ``.model``.
- :class:`DCPSource`: a Composer sharded checkpoint folder (``torch.distributed.checkpoint``: ``.metadata``,
  ``__<rank>_0.distcp``) as FSDP runs with ``state_dict_type: sharded`` write; model tensors are named
  ``state.model.model.<HF key>``.
- :class:`DictSource`: an in-memory state dict (the training callback's gathered weights).

Pickled formats are read through :mod:`foundry_dbrx.hf.safe_load`: no code from the file runs unless the caller
passes ``trust_code``.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch

from foundry_dbrx.hf.files import HF_INDEX, HF_SINGLE_FILE
from foundry_dbrx.hf.keys import COMPOSER_MODEL_PREFIX, DCP_STATE_MODEL, KeyMismatchError, clean_names, strip_wrappers
from foundry_dbrx.hf.safe_load import SafeFileSystemReader, load_pt

__all__ = ['TensorSpec', 'HFSource', 'TorchSaveSource', 'DCPSource', 'DictSource', 'open_composer_source',
           'CARRY_KEY']

PathLike = Union[str, os.PathLike]

# Our own top-level key in a .pt: the source config.json and the small HF files, so that HF -> Composer -> HF gives
# back the tokenizer and config without extra flags. Composer reads only 'state' and 'rng' and ignores it.
CARRY_KEY = 'foundry_dbrx'

_SAFETENSORS_DTYPES = {
    'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
    'BOOL': torch.bool,
}


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


class HFSource:
    """An HF folder's safetensors: specs from the headers; tensors read per shard file."""

    def __init__(self, hf_dir: PathLike):
        from safetensors import SafetensorError, safe_open
        self.dir = Path(hf_dir)
        index_path, single = self.dir / HF_INDEX, self.dir / HF_SINGLE_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text()).get('weight_map')
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise ValueError(f'{index_path}: not a JSON object with a weight_map ({e})') from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f'{index_path}: weight_map must be a non-empty {{key: file}} mapping')
            files = sorted(set(weight_map.values()))
            bad = [f for f in files if not isinstance(f, str) or Path(f).name != f or f.startswith('.')]
            if bad:
                raise ValueError(f'{index_path}: weight_map names {bad[:5]}, not plain file names in {hf_dir}')
        elif single.is_file():
            weight_map, files = None, [HF_SINGLE_FILE]
        else:
            raise FileNotFoundError(f'{hf_dir}: neither {HF_INDEX} nor {HF_SINGLE_FILE}; only safetensors weights '
                                    'are read')
        specs: dict[str, TensorSpec] = {}
        raw: list[str] = []
        self._layouts: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}  # file -> _safetensors_layout(file)
        disagreements = []
        for name in files:
            try:
                with safe_open(self.dir / name, framework='pt') as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                        if dtype is None:
                            raise ValueError(f'{self.dir / name}: {key} has dtype {sl.get_dtype()}, not one of '
                                             f'{sorted(_SAFETENSORS_DTYPES)}')
                        if weight_map is not None and weight_map.get(key) != name:
                            disagreements.append(f'{key} is in {name}, index says {weight_map.get(key)}')
                        raw.append(key)
                        specs[key] = TensorSpec(tuple(sl.get_shape()), dtype, name)
            except (SafetensorError, OSError) as e:
                raise ValueError(_unreadable_safetensors(self.dir / name, e)) from None
        self._raw_names = clean_names(raw, str(self.dir))  # our key -> the key as the file spells it
        self.specs = {k: specs[r] for k, r in self._raw_names.items()}
        if weight_map is not None:
            disagreements += [f'{k} listed in the index but not in {f}' for k, f in weight_map.items()
                              if strip_wrappers(k) not in self.specs]
        if disagreements:
            raise ValueError(f'{index_path} disagrees with the shard files: ' + '; '.join(disagreements[:20]))

    def by_file(self, keys: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(self.specs[k].file, []).append(k)
        yield from groups.items()

    def iter_tensors(self, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (key, tensor) one at a time, opening each shard file once."""
        from safetensors import SafetensorError, safe_open
        for name, group in self.by_file(keys):
            try:
                with safe_open(self.dir / name, framework='pt') as f:
                    for k in group:
                        yield k, f.get_tensor(self._raw_names[k])
            except (SafetensorError, OSError) as e:  # changed or damaged since its header was read
                raise ValueError(_unreadable_safetensors(self.dir / name, e)) from None

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


def _unreadable_safetensors(path: Path, error: BaseException) -> str:
    # safetensors' own errors do not name the file
    return (f'{path}: not a readable safetensors file ({type(error).__name__}: {" ".join(str(error).split())}); '
            'cut short or damaged? Copy or convert it again')


def _why_not_torch_zip(path: Path) -> str:
    """Why a file that is not a readable zip is not a torch.save checkpoint, from its first bytes."""
    with open(path, 'rb') as f:
        head = f.read(512)
    if head.startswith(b'PK\x03\x04'):
        return (f'a zip file with no directory at its end ({path.stat().st_size:,} bytes): cut short while being '
                'written or copied? Use an earlier checkpoint or copy it again')
    if head.startswith((b'\x1f\x8b', b'\x04\x22\x4d\x18', b'\x28\xb5\x2f\xfd')) or head[257:262] == b'ustar':
        return 'a compressed Composer checkpoint (.tar / .gz / .lz4 / .zst): decompress it first'
    return 'not a torch.save checkpoint (no zip header)'


def _safetensors_layout(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(where the data starts, key -> (begin, end) byte offsets in the data) from a safetensors header: 8 bytes of
    little-endian header length, then the JSON header."""
    with open(path, 'rb') as f:
        (n,) = struct.unpack('<Q', f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, {k: tuple(v['data_offsets']) for k, v in header.items() if k != '__metadata__'}


def _composer_name(key: str) -> str:
    key = strip_wrappers(key)
    return key[len('module.'):] if key.startswith('module.') else key  # pre-0.6 Composer DDP checkpoints


def _composer_model_keys(keys: Iterable[str], where: str) -> dict[str, str]:
    """HF key -> Composer key for every entry of a Composer ``state['model']``."""
    names = clean_names(keys, where, clean=_composer_name)
    unprefixed = [raw for name, raw in names.items() if not name.startswith(COMPOSER_MODEL_PREFIX)]
    if unprefixed:
        raise KeyMismatchError(f'{where} (Composer keys must start with {COMPOSER_MODEL_PREFIX!r}, '
                               'as ComposerDbrxCausalLM holds the net as .model)', sorted(unprefixed), [], [])
    return {name[len(COMPOSER_MODEL_PREFIX):]: raw for name, raw in names.items()}


class TorchSaveSource:
    """A monolithic Composer checkpoint, memory-mapped: only the tensors being copied become resident."""

    def __init__(self, path: PathLike, trust_code: bool = False):
        self.path = Path(path)
        self.trust_code = trust_code
        if not zipfile.is_zipfile(self.path):
            raise ValueError(f'{path}: {_why_not_torch_zip(self.path)}')
        ckpt = load_pt(self.path, trust_code=trust_code)
        model = (ckpt.get('state') or {}).get('model') if isinstance(ckpt, dict) else None
        if not isinstance(model, Mapping):
            raise ValueError(f"{path}: no state['model'] dict; top-level keys are "
                             f"{sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__}")
        not_tensors = sorted(k for k, v in model.items() if not isinstance(v, torch.Tensor))
        if not_tensors:
            raise ValueError(f"{path}: state['model'] entries that are not tensors: {not_tensors[:10]}")
        self.names = _composer_model_keys(model, str(path))
        self.specs = {k: TensorSpec(tuple(model[c].shape), model[c].dtype) for k, c in self.names.items()}
        self.carried = ckpt.get(CARRY_KEY) or {}
        if not isinstance(self.carried, Mapping):
            raise ValueError(f'{path}: its {CARRY_KEY!r} entry must be a dict, not {type(self.carried).__name__}')
        del ckpt, model

    def load(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        # A fresh mapping per call: tensors read now are released with it, so residency never builds up.
        model = load_pt(self.path, trust_code=self.trust_code)['state']['model']
        return {k: model[self.names[k]] for k in keys}


class DCPSource:
    """A Composer sharded checkpoint folder (torch.distributed.checkpoint), read key by key in one process."""

    def __init__(self, path: PathLike, trust_code: bool = False):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        self.path = Path(path)
        self.trust_code = trust_code
        metadata = self._reader().read_metadata()
        # Every data file the metadata points at must be a plain file of this folder: a name like ../../x would
        # read (and export) another file.
        bad = sorted({info.relative_path for info in (metadata.storage_data or {}).values()
                      if not isinstance(getattr(info, 'relative_path', None), str)
                      or Path(info.relative_path).name != info.relative_path})
        if bad:
            raise ValueError(f'{self.path / ".metadata"}: storage entries name {bad[:5]}, not files of {self.path}')
        tensors = {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        model_keys = {k[len(DCP_STATE_MODEL):]: v for k, v in tensors.items() if k.startswith(DCP_STATE_MODEL)}
        if not model_keys:
            raise ValueError(f"{path}: no tensors under state.model in this sharded checkpoint; found prefixes "
                             f"{sorted({k.split('.')[0] for k in metadata.state_dict_metadata})}")
        self.names = _composer_model_keys(model_keys, str(path))
        self.specs = {}
        for hf_key, composer_key in self.names.items():
            md = model_keys[composer_key]
            self.specs[hf_key] = TensorSpec(tuple(md.size), md.properties.dtype)
        self.carried = {}

    def _reader(self) -> SafeFileSystemReader:
        return SafeFileSystemReader(self.path, trust_code=self.trust_code)

    def load(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp
        wanted = {self.names[k]: torch.empty(self.specs[k].shape, dtype=self.specs[k].dtype) for k in keys}
        # Nested as Composer saved it; DCP flattens it to the same dotted names and fills only these tensors (read
        # with weights_only=True; the non-tensor entries, which DCP would unpickle in full, are never asked for).
        with _warnings_suppressed():
            dcp.load({'state': {'model': wanted}}, storage_reader=self._reader(), no_dist=True)
        return {k: wanted[self.names[k]] for k in keys}


class DictSource:
    """An in-memory state dict (the training callback's gathered weights), HF key names."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], where: str = 'state dict'):
        names = clean_names(state_dict, where)
        self.tensors = {k: state_dict[raw] for k, raw in names.items()}
        self.specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in self.tensors.items()}
        self.carried = {}

    def load(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        return {k: self.tensors[k] for k in keys}


@contextlib.contextmanager
def _warnings_suppressed():
    # DCP warns that no process group is initialised; one process reading a checkpoint is exactly the intent here.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


def open_composer_source(ckpt: PathLike, trust_code: bool = False) -> Union[TorchSaveSource, DCPSource]:
    """The reader for a Composer checkpoint: a sharded folder (with ``.metadata``) or a monolithic ``.pt``."""
    path = Path(ckpt)
    if path.is_dir():
        if not (path / '.metadata').is_file():
            raise FileNotFoundError(f'{ckpt}: a folder, but not a Composer sharded checkpoint (no .metadata)')
        return DCPSource(path, trust_code)
    if not path.is_file():
        raise FileNotFoundError(f'{ckpt}: no such checkpoint file or folder')
    return TorchSaveSource(path, trust_code)
