"""Reading Composer checkpoints without running code from them.

A ``.pt`` file and a sharded checkpoint's ``.metadata`` are pickles, and unpickling runs whatever callables the
file names. Both are read here with an allowlist: the tensor machinery ``torch.load(weights_only=True)`` allows,
plus exactly the other types that real Composer / LLM Foundry checkpoints of this project contain
(:data:`CHECKPOINT_TYPES`, each with the place it was found). Anything else is refused with an error that names
it; ``trust_code=True`` (``--trust-checkpoint-code``) loads with full pickle instead, for checkpoints the user made
or trusts.
"""

from __future__ import annotations

import collections
import datetime
import pathlib
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs
import torch.distributed.checkpoint.metadata as dcp_md
from torch.torch_version import TorchVersion

# numpy 2 moved numpy.core to numpy._core; checkpoints name the module of the numpy that wrote them.
_numpy_core = getattr(np, '_core', None) or np.core

__all__ = ['CHECKPOINT_TYPES', 'UnsafeCheckpointError', 'load_pt', 'load_dcp_metadata', 'SafeFileSystemReader']

# type -> where real checkpoints of this project hold it. Found by loading, with a recording unpickler, a
# monolithic checkpoint of a CPU run of tests/yamls/dbrx-micro.yaml (Composer 0.32.1, numpy 2.1.3) and the .metadata
# of a sharded one (the same YAML, `composer -n 2`, FSDP_VERSION=2, fsdp_config.state_dict_type: sharded).
CHECKPOINT_TYPES: dict[Any, str] = {
    # monolithic .pt (torch.load); tensors, dtypes, OrderedDict and torch.Size need nothing beyond weights_only
    datetime.timedelta: "state['timestamp'] (Timestamp's *_wct fields) and the CheckpointSaver callback's "
                        'saved timestamps',
    np.ndarray: "rng[i]['numpy']: numpy.random.get_state()'s MT19937 key",
    np.dtype: 'the dtype of that array',
    np.dtypes.UInt32DType: 'the class of that dtype (numpy >= 1.25 pickles it)',
    _numpy_core.multiarray._reconstruct: 'how numpy pickles that array',
    TorchVersion: "state['metadata']['torch_version']",
    # sharded checkpoint .metadata (torch.distributed.checkpoint)
    dcp_md.Metadata: '.metadata: the root object',
    dcp_md.TensorStorageMetadata: '.metadata: every tensor entry',
    dcp_md.TensorProperties: '.metadata: every tensor entry (dtype, layout ...)',
    dcp_md._MEM_FORMAT_ENCODING: '.metadata: TensorProperties.memory_format',
    dcp_md.ChunkStorageMetadata: '.metadata: every shard of a tensor',
    dcp_md.BytesStorageMetadata: '.metadata: every non-tensor entry (optimizer hyperparameters, rng, timestamp)',
    dcp_md.MetadataIndex: '.metadata: storage_data keys',
    dcp_md.StorageMeta: '.metadata: storage_meta',
    dcp_fs._StorageInfo: '.metadata: storage_data values (file, offset, length)',
    pathlib.PosixPath: '.metadata: storage_meta.checkpoint_id (the folder Composer saved to)',
}


def _qualname(obj: Any) -> str:
    return f'{obj.__module__}.{obj.__qualname__}'


_ALLOWED = {_qualname(t): t for t in CHECKPOINT_TYPES}
# What the sharded metadata needs beyond those and that weights_only allows by default: sizes, dtypes, layouts.
_ALLOWED.update({'torch.Size': torch.Size, 'torch.serialization._get_layout': torch.serialization._get_layout,
                 'collections.OrderedDict': collections.OrderedDict})

TRUST_HINT = ('only if you made this checkpoint or trust whoever did, pass --trust-checkpoint-code '
              '(trust_code=True), which unpickles it in full and runs any code it holds')


class UnsafeCheckpointError(ValueError):
    """A checkpoint names a type outside the allowlist; loading it would run code the file chooses."""


def load_pt(path: Path, *, mmap: bool = True, trust_code: bool = False) -> Any:
    """``torch.load`` of a ``.pt`` on CPU, allowing :data:`CHECKPOINT_TYPES` only (unless ``trust_code``)."""
    if trust_code:
        return torch.load(path, map_location='cpu', mmap=mmap, weights_only=False)
    with torch.serialization.safe_globals(list(CHECKPOINT_TYPES)):
        try:
            return torch.load(path, map_location='cpu', mmap=mmap, weights_only=True)
        except pickle.UnpicklingError as e:
            # Name what was refused, read from the pickle's opcodes without running them.
            try:
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:
                names = []
            what = (f'it names {", ".join(names)}, not a type Composer checkpoints contain' if names else
                    'weights_only unpickling failed: ' + _first_line(str(e)))
            raise UnsafeCheckpointError(f'{path}: refused to load: {what}; {TRUST_HINT}') from None
        except (RuntimeError, EOFError) as e:  # a truncated or corrupt zip
            raise ValueError(f'{path}: cannot read it as a torch.save checkpoint: {_first_line(str(e))}') from None


def _first_line(message: str) -> str:
    for line in message.splitlines():
        if 'WeightsUnpickler error' in line:
            return line.strip()
    return message.strip().splitlines()[0] if message.strip() else 'unknown error'


class _RestrictedUnpickler(pickle.Unpickler):
    """The standard library's recipe for restricting globals: only allowlisted names resolve."""

    def __init__(self, file: BinaryIO, where: Path):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        qualname = f'{module}.{name}'
        if qualname in _ALLOWED:
            return _ALLOWED[qualname]
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f'{self.where}: refused to load: it names {qualname}, not a type sharded '
                                    f'Composer checkpoints contain; {TRUST_HINT}')


def load_dcp_metadata(path: Path, *, trust_code: bool = False) -> dcp_md.Metadata:
    """A sharded checkpoint's ``.metadata`` (the file itself), unpickled with the allowlist."""
    with open(path, 'rb') as f:
        if trust_code:
            metadata = pickle.load(f)
        else:
            try:
                metadata = _RestrictedUnpickler(f, path).load()
            except UnsafeCheckpointError:
                raise
            except Exception as e:  # truncated or not a pickle at all
                raise ValueError(f'{path}: not a readable checkpoint metadata file ({type(e).__name__}: {e})') from None
    if not isinstance(metadata, dcp_md.Metadata):
        raise ValueError(f'{path}: holds a {type(metadata).__name__}, not torch.distributed.checkpoint Metadata')
    return metadata


class SafeFileSystemReader(dcp_fs.FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` uses :func:`load_dcp_metadata`.

    torch 2.7's ``FileSystemReader.read_metadata`` reads ``.metadata`` with plain ``pickle.load``, which runs any
    code the file names even where the tensors themselves are read with ``weights_only=True`` (pytorch/pytorch issue
    189308); this override is the one place that changes.
    """

    def __init__(self, path: Path, trust_code: bool = False):
        super().__init__(str(path))
        self._trust_code = trust_code
        self._folder = Path(path)

    def read_metadata(self) -> dcp_md.Metadata:
        metadata = load_dcp_metadata(self._folder / '.metadata', trust_code=self._trust_code)
        if getattr(metadata, 'storage_meta', None) is None:
            metadata.storage_meta = dcp_md.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
