"""The conversions: HF folder -> Composer ``.pt`` (:func:`hf_to_composer`), Composer checkpoint -> HF folder
(:func:`composer_to_hf`), and an in-memory state dict -> HF folder (:func:`save_hf_checkpoint`, for the training
callback).

Memory: HF -> Composer writes the ``.pt`` skeleton without data (``torch.serialization.skip_data``) and fills it one
HF shard at a time through a shared memory map that is dropped after each shard; Composer -> HF reads only the
tensors of the output shard being written. Peak memory is a small multiple of the largest shard, not the model
(tests/test_hf_convert.py measures it).

Outputs go through :func:`foundry_dbrx.outputs.atomic_output`: built under a hidden temporary name, installed with
a no-replace rename, never over anything but an earlier output of the same kind, with the free space checked first.
Exports refuse non-finite weights and a cast to float16 that would overflow.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import re
import struct
import stat
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from foundry_dbrx.config import DbrxConfig
from foundry_dbrx.hf.config_map import (architecture_differences, hf_config_dict, load_hf_config,
                                        read_config_source)
from foundry_dbrx.hf.files import (HF_CONFIG, HF_GENERATION_CONFIG, HF_INDEX, HF_SINGLE_FILE, carry_files,
                                   check_carried_files)
from foundry_dbrx.hf.keys import COMPOSER_MODEL_PREFIX, check_keys, expected_shapes
from foundry_dbrx.hf.readers import CARRY_KEY, DictSource, HFSource, TensorSpec, open_composer_source
from foundry_dbrx.hf.router_bias import (ROUTER_BIAS_HF_KEY, ROUTER_BIAS_KEY, router_bias_from_hf_config,
                                         router_bias_from_state, split_router_bias)
from foundry_dbrx.hf.safe_load import load_pt
from foundry_dbrx.outputs import atomic_output

__all__ = ['DTYPES', 'HF_EXPORT', 'PT_EXPORT', 'hf_to_composer', 'composer_to_hf', 'save_hf_checkpoint',
           'parse_size', 'NonFiniteWeightsError']

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
# The names the outputs' markers record: an HF folder (from composer-to-hf or dbrx_hf_checkpointer) and a .pt.
HF_EXPORT = 'HF export'
PT_EXPORT = 'convert hf-to-composer'


class NonFiniteWeightsError(ValueError):
    """A weight is NaN or infinite, or becomes infinite when cast to the output dtype."""


def _count_non_finite(t: torch.Tensor, chunk: int = 1 << 18) -> int:
    """How many elements of ``t`` are NaN or infinite, looked at in chunks: the temporaries stay small (a whole
    -tensor ``isfinite`` tripled the peak memory of a streamed export)."""
    flat = t.reshape(-1)
    return sum(int(torch.isfinite(part).logical_not_().sum()) for part in flat.split(chunk))


def _checked_cast(t: torch.Tensor, dtype: Optional[torch.dtype], key: str, where: str,
                  refuse_non_finite: bool = True) -> torch.Tensor:
    """``t`` in ``dtype``, after checking that it is finite (unless told not to) and that the cast does not turn a
    finite value into an infinite one."""
    if not t.is_floating_point():
        return t if dtype is None else t.to(dtype)
    bad = _count_non_finite(t) if refuse_non_finite else 0
    if bad:
        raise NonFiniteWeightsError(f'{where}: {key} holds {bad} non-finite value(s) (NaN or inf) of {t.numel()}; '
                                    'refusing to export non-finite weights (the run diverged before this '
                                    'checkpoint: use an earlier one)')
    if dtype is None or t.dtype == dtype:
        return t
    out = t.to(dtype)
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(t.dtype).max:
        overflow = int((torch.isfinite(t) & ~torch.isfinite(out)).sum())
        if overflow:
            largest = t.abs().max().item()
            raise NonFiniteWeightsError(
                f'{where}: casting {key} to {str(dtype).removeprefix("torch.")} overflows: {overflow} value(s) '
                f'exceed its largest finite value {torch.finfo(dtype).max:g} (largest magnitude {largest:.4g}); '
                'export in bfloat16 or float32 instead')
    return out


# --------------------------------------------------------------------------------------------------------------------
# HF -> Composer
# --------------------------------------------------------------------------------------------------------------------
def _is_converted_pt(path: Path) -> bool:
    """Whether ``path`` is a .pt that hf_to_composer wrote (it carries our top-level key), read without running
    code from it."""
    try:
        ckpt = load_pt(path)
    except Exception:
        return False
    return isinstance(ckpt, dict) and isinstance(ckpt.get(CARRY_KEY), dict)


def hf_to_composer(hf_dir: PathLike, out_path: PathLike, *, dtype: Optional[torch.dtype] = None,
                   overwrite: bool = False, progress: bool = False) -> Path:
    """Converts an HF DBRX folder into a Composer checkpoint (``.pt``) that a training YAML loads with
    ``load_path`` and ``load_weights_only: true``.

    Tensors keep their dtype unless ``dtype`` is given. config.json and the folder's tokenizer and generation files
    (:data:`foundry_dbrx.hf.files.CARRIED_FILES`) travel inside the checkpoint, so :func:`composer_to_hf` can
    restore them. Holds about one HF shard in memory at a time. ``overwrite`` replaces only a ``.pt`` this function
    wrote.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if out_path.suffix != '.pt':
        raise ValueError(f'out_path ({out_path}) must end in .pt (a Composer monolithic checkpoint)')
    cfg, raw_config = load_hf_config(hf_dir)
    source = HFSource(hf_dir)
    check_keys({k: s.shape for k, s in source.specs.items()}, cfg, f'{hf_dir}')
    order = list(expected_shapes(cfg))
    bias_LE = router_bias_from_hf_config(raw_config, cfg, str(hf_dir / HF_CONFIG))
    carried = {'hf_config': raw_config, 'hf_files': carry_files(hf_dir), 'written_by': f'foundry-dbrx {PT_EXPORT}'}
    total = sum(TensorSpec(source.specs[k].shape, dtype or source.specs[k].dtype).nbytes for k in order)
    where = str(hf_dir)
    with atomic_output(out_path, command=PT_EXPORT, overwrite=overwrite, is_dir=False, inputs=[hf_dir],
                       needed_bytes=total, earlier_output=_is_converted_pt) as tmp:
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
        # 2. Allocate the holes now: a store through the memory map into a hole the filesystem cannot back kills the
        #    process with SIGBUS (no message, the hidden file left behind); here a full disk is an OSError instead.
        with open(tmp, 'r+b') as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        # 3. Fill the holes one HF shard at a time through a shared mapping of the file, dropped after each shard
        #    so that its pages leave this process.
        with _progress(total, f'{hf_dir.name} -> {out_path.name}', progress) as bar:
            for name, keys in source.by_file(order):
                with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
                    target = torch.load(tmp, mmap=True, weights_only=True)['state']['model']
                for key in keys:
                    out = target[COMPOSER_MODEL_PREFIX + key]
                    if dtype is None or dtype == source.specs[key].dtype:
                        source.read_into(key, out)
                    else:
                        tensor = next(source.iter_tensors([key]))[1]
                        # An import keeps what the HF folder holds; only an overflowing cast is refused.
                        out.copy_(_checked_cast(tensor, dtype, key, where, refuse_non_finite=False))
                    bar.update(source.specs[key].nbytes)
                del target
        if bias_LE is not None:
            with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
                target = torch.load(tmp, mmap=True, weights_only=True)['state']['model']
            for i in range(cfg.n_layers):
                target[COMPOSER_MODEL_PREFIX + ROUTER_BIAS_KEY.format(i=i)].copy_(bias_LE[i])
            del target
        # 4. skip_data wrote the zip's CRC-32s for the empty holes; correct them so zip tools accept the file.
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
              files: Optional[Mapping[str, bytes]] = None, tokenizer: Any = None, desc: str = '',
              where: str = 'checkpoint', inputs: Sequence[PathLike] = ()) -> Path:
    from safetensors.torch import save_file
    weight_keys, bias_keys = split_router_bias(source.specs)
    check_keys({k: source.specs[k].shape for k in weight_keys}, cfg, where)
    bias_LE = router_bias_from_state(source.load(bias_keys), cfg, where) if bias_keys else None
    order = list(expected_shapes(cfg))
    shards = _plan_shards(order, source.specs, parse_size(shard_size), dtype)
    names = ([HF_SINGLE_FILE] if len(shards) == 1 else
             [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
    dtypes = {dtype or source.specs[k].dtype for k in order}
    total = sum(TensorSpec(source.specs[k].shape, dtype or source.specs[k].dtype).nbytes for k in order)
    with atomic_output(out_dir, command=HF_EXPORT, overwrite=overwrite, is_dir=True, inputs=inputs,
                       needed_bytes=total, option='OUT_DIR') as tmp:
        weight_map = {}
        with _progress(total, desc or f'-> {out_dir.name}', progress) as bar:
            for name, keys in zip(names, shards):
                tensors = source.load(keys)
                for k in keys:
                    tensors[k] = _checked_cast(tensors[k], dtype, k, where).contiguous()
                    weight_map[k] = name
                _save_safetensors(save_file, tensors, tmp / name)
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


def _save_safetensors(save_file: Any, tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, path, metadata={'format': 'pt'})  # transformers requires format=pt
        # safetensors creates its files 0600; give them the folder's umask-derived mode, like the rest.
        os.chmod(path, stat.S_IMODE(path.parent.stat().st_mode) & 0o666)
    except Exception as e:
        # safetensors writes from Rust and reports a full disk as a SafetensorError quoting the OS error; give it
        # back its errno, so that it reads as the disk-full error it is.
        if 'os error 28' in str(e) or 'StorageFull' in str(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def _export_config(ckpt: PathLike, config: Union[None, PathLike, DbrxConfig],
                   carried_config: Optional[Mapping]) -> DbrxConfig:
    """The config to export with: ``config`` if given (checked against the architecture the checkpoint carries,
    if it carries one), else the carried one."""
    carried = None
    if carried_config is not None:
        if not isinstance(carried_config, Mapping):
            raise ValueError(f"{ckpt}: its carried hf_config must be a dict, not {type(carried_config).__name__}")
        try:
            carried = DbrxConfig.from_dict(carried_config)
        except ValueError as e:
            raise ValueError(f'{ckpt}: the config.json it carries is not a DBRX config: {e}') from None
    if config is None:
        if carried is None:
            raise ValueError(f'{ckpt} carries no model config: pass config= (--config): the training YAML, an HF '
                             'config.json or an HF folder')
        return carried
    cfg = config if isinstance(config, DbrxConfig) else read_config_source(config)
    if carried is not None:
        differences = architecture_differences(cfg.to_dict(), carried.to_dict(), f'--config ({config})'
                                               if not isinstance(config, DbrxConfig) else 'config=',
                                               f'the config.json carried by {ckpt}')
        if differences:
            raise ValueError(f'{ckpt}: --config contradicts the architecture the checkpoint carries on '
                             f'{len(differences)} field(s): {"; ".join(differences)}; leave --config out (the '
                             'carried config is used) or give the config this checkpoint was trained with')
    return cfg


def composer_to_hf(ckpt: PathLike, out_dir: PathLike, *, config: Union[None, PathLike, DbrxConfig] = None,
                   shard_size: Union[int, str] = '5GB', dtype: Optional[torch.dtype] = None,
                   tokenizer_dir: Optional[PathLike] = None, overwrite: bool = False,
                   progress: bool = False, trust_code: bool = False) -> Path:
    """Converts a Composer checkpoint (monolithic ``.pt`` or an FSDP sharded folder) into an HF DBRX folder that
    ``transformers.DbrxForCausalLM.from_pretrained`` loads with no remote code.

    ``config``: a :class:`DbrxConfig`, an HF folder / config.json, or the training YAML; optional for checkpoints
    written by :func:`hf_to_composer`, which carry their config.json (a ``config`` that contradicts its architecture
    is an error). ``tokenizer_dir``: an HF folder whose tokenizer and generation files are copied (else those
    carried by the checkpoint, if any). ``trust_code``: unpickle the checkpoint in full, running any code it holds,
    instead of allowing only the types Composer checkpoints contain. Holds about one output shard in memory at a
    time. Refuses non-finite weights and a float16 cast that overflows; ``overwrite`` replaces only an earlier HF
    export.
    """
    source = open_composer_source(ckpt, trust_code)
    carried = source.carried
    base_config = carried.get('hf_config')
    cfg = _export_config(ckpt, config, base_config)
    files = dict(check_carried_files(carried.get('hf_files') or {}, str(ckpt)))
    if tokenizer_dir is not None:
        files = carry_files(Path(tokenizer_dir))
    inputs = [p for p in (ckpt, tokenizer_dir, None if isinstance(config, DbrxConfig) else config) if p is not None]
    return _write_hf(source, cfg, Path(out_dir), shard_size=shard_size, dtype=dtype, overwrite=overwrite,
                     progress=progress, base_config=base_config, files=files,
                     desc=f'{Path(ckpt).name} -> {Path(out_dir).name}', where=str(ckpt), inputs=inputs)


def save_hf_checkpoint(state_dict: Mapping[str, torch.Tensor], cfg: DbrxConfig, out_dir: PathLike, *,
                       shard_size: Union[int, str] = '5GB', dtype: Optional[torch.dtype] = None,
                       tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Writes an in-memory DBRX state dict (HF key names) as an HF folder, with ``tokenizer.save_pretrained``.
    Refuses non-finite weights and a float16 cast that overflows; ``overwrite`` replaces only an earlier HF
    export."""
    return _write_hf(DictSource(state_dict, f'state dict for {out_dir}'), cfg, Path(out_dir), shard_size=shard_size,
                     dtype=dtype, overwrite=overwrite, progress=False, tokenizer=tokenizer,
                     where=f'weights for {out_dir}')


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------
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
