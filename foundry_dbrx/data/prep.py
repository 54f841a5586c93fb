"""``foundry-dbrx prep-data``: text into MDS shards of fixed-length token samples for LLM Foundry's ``text`` loader.

Inputs: folders of text files (one file = one document), JSONL files (one line = one document, ``--text-field``),
Hugging Face ``datasets`` saved with ``save_to_disk``, or ``--default``: the Python standard library sources of the
running interpreter, real text every machine has offline. Documents are tokenized with cl100k_base (DBRX's
tokenizer), each followed by ``<|endoftext|>`` (100257), concatenated and cut into samples of ``--max-seq-len``
tokens; the incomplete tail is dropped and reported. Samples go to ``OUT/train`` and ``OUT/val`` as MDS shards with
one column, ``tokens`` (``ndarray:int32``), the format LLM Foundry's ``convert_dataset_hf --concat_tokens`` writes.

Nothing that looks complete is left behind on failure: shards are written into a hidden temporary folder, which is
installed (local ``OUT``, through :func:`foundry_dbrx.outputs.atomic_output`: a lock, a no-replace rename, a marker
file) or uploaded (``s3://bucket/prefix`` through :class:`foundry_dbrx.data.remote.S3Output`, in an order that never
shows a mix of two datasets; other URLs Streaming knows get a new dataset only) once every input has been read.
``--overwrite`` replaces only an earlier output of prep-data, never the user's files, and ``OUT`` may not be, hold
or lie inside an input.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from foundry_dbrx.data.cl100k import ENDOFTEXT_ID, load_cl100k_encoding
from foundry_dbrx.data.remote import INDEX, RemoteError, S3Output, redact
from foundry_dbrx.outputs import (OutputError, atomic_output, clean_stale_temporaries, disk_full_as_error,
                                  output_lock, temporary_sibling, write_marker)

__all__ = ['PrepConfig', 'PrepError', 'PrepSummary', 'prep_data', 'default_corpus_files', 'add_arguments', 'run']

log = logging.getLogger(__name__)

INPUT_FORMATS = ('auto', 'text', 'jsonl', 'hf')
SPLITS = ('train', 'val')
MDS_COLUMNS = {'tokens': 'ndarray:int32'}
# Streaming checks a shard against these when a YAML sets validate_hash (sha1, or the much faster xxh3_64).
MDS_HASHES = ['sha1', 'xxh3_64']
COMMAND = 'prep-data'  # the name in the marker that lets --overwrite recognise an earlier output
# Folders of the standard library that are not the library: other packages, bytecode, and the test suites
# (half the tokens, with deliberately odd files such as non-UTF-8 encodings).
_DEFAULT_CORPUS_SKIP = frozenset({'site-packages', 'dist-packages', '__pycache__', 'test', 'tests', 'idle_test'})
# Text handed to one tokenizer call: large enough to amortise inter-process traffic, small enough to stream.
_BATCH_CHARS = 1 << 20


def default_workers() -> int:
    """Tokenizer processes by default: 2 where this process may use 2 cores or more (on an idle 2-core machine 2
    workers gave 3.1-3.6M tokens/s against 2.1M for 1), else 1. Bigger machines may pass more."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


class PrepError(ValueError):
    """Bad input or output for prep-data; the message names the file (and line) or the option at fault."""


@dataclass(kw_only=True, frozen=True)
class PrepConfig:
    """What ``prep-data`` does; every field is a command-line option of the same name (``-`` for ``_``)."""

    inputs: tuple[str, ...] = ()
    default: bool = False
    out: str
    format: str = 'auto'
    text_field: str = 'text'
    split: str = 'train'
    max_seq_len: int = 128
    val_fraction: float = 0.01
    max_tokens: Optional[int] = None
    max_files: Optional[int] = None
    shard_size: str = '64mb'
    compression: Optional[str] = None
    workers: int = dataclasses.field(default_factory=default_workers)
    overwrite: bool = False
    progress: bool = True
    tmp_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.default == bool(self.inputs):
            raise PrepError(f'give input paths or --default, not {"both" if self.default else "neither"} '
                            f'(inputs {list(self.inputs)!r})')
        if not self.out:
            raise PrepError('--out must name a local folder or a remote URL such as s3://bucket/prefix')
        if self.format not in INPUT_FORMATS:
            raise PrepError(f'--format ({self.format!r}) must be one of {list(INPUT_FORMATS)}')
        if not self.text_field:
            raise PrepError('--text-field must not be empty')
        for name in ('max_seq_len', 'workers'):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise PrepError(f'--{name.replace("_", "-")} ({value!r}) must be a positive integer')
        for name in ('max_tokens', 'max_files'):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise PrepError(f'--{name.replace("_", "-")} ({value!r}) must be a positive integer when given')
        if not 0.0 <= self.val_fraction <= 0.5:
            raise PrepError(f'--val-fraction ({self.val_fraction!r}) must be in [0, 0.5]')
        from streaming.base.util import bytes_to_int
        try:
            size = bytes_to_int(self.shard_size)
        except (ValueError, TypeError):
            size = -1
        if not 0 < size < 2**32:  # Streaming stores sample offsets as uint32
            raise PrepError(f'--shard-size ({self.shard_size!r}) must be a size below 4 GiB, such as 64mb or 512kb')
        if self.compression is not None:
            from streaming.base.compression import is_compression
            if not is_compression(self.compression):
                raise PrepError(f'--compression ({self.compression!r}) is not a compression Streaming knows '
                                '(for example zstd, gz, bz2, snappy)')

    @property
    def remote(self) -> bool:
        return _is_remote(self.out)

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.val_fraction > 0 else ('train',)


@dataclass(kw_only=True)
class PrepSummary:
    """What a prep run produced (printed at the end, returned by :func:`prep_data`)."""

    out: str
    documents: int = 0
    empty_documents: int = 0
    undecodable_files: int = 0
    tokens: int = 0
    samples: dict = dataclasses.field(default_factory=lambda: {s: 0 for s in SPLITS})
    dropped_tail_tokens: int = 0
    shards: dict = dataclasses.field(default_factory=lambda: {s: 0 for s in SPLITS})
    bytes: int = 0
    seconds: float = 0.0
    # for the disk-full estimate: bytes of the text and JSONL files started so far, tokens the tokenizer returned
    input_bytes_read: int = 0
    tokens_encoded: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        skipped = [f'{self.empty_documents} empty']
        if self.undecodable_files:
            skipped.append(f'{self.undecodable_files} not UTF-8')
        return [
            f'[prep-data] wrote {self.out}',
            f'[prep-data] documents: {self.documents:,} (skipped: {", ".join(skipped)})',
            f'[prep-data] tokens: {self.tokens:,} (with one <|endoftext|> per document); dropped tail: '
            f'{self.dropped_tail_tokens:,} tokens',
            f'[prep-data] samples: train {self.samples["train"]:,}, val {self.samples["val"]:,}; shards: '
            f'train {self.shards["train"]}, val {self.shards["val"]}; {self.bytes:,} bytes',
            f'[prep-data] {self.seconds:.1f} s, {self.tokens_per_second:,.0f} tokens/s',
        ]


class Document(NamedTuple):
    text: str
    where: str  # file, file:line or dataset[row]: what an error message points at


def _is_remote(path: str) -> bool:
    return urllib.parse.urlparse(path).scheme not in ('', 'file')


# ---------------------------------------------------------------------------------------------------------- inputs

def default_corpus_files(max_files: Optional[int] = None) -> list[str]:
    """The ``--default`` corpus: the interpreter's standard library ``*.py`` files, sorted by path, tests left out."""
    root = sysconfig.get_paths()['stdlib']
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in _DEFAULT_CORPUS_SKIP)
        files.extend(os.path.join(folder, n) for n in sorted(names) if n.endswith('.py'))
    if not files:
        raise PrepError(f'--default: no *.py files under the standard library folder {root}')
    return files[:max_files]


def _decode(data: bytes, path: str, first_line: int = 1) -> str:
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as e:
        line = first_line + data.count(b'\n', 0, e.start)
        column = e.start - (data.rfind(b'\n', 0, e.start) + 1) + 1
        raise PrepError(f'{path}:{line}:{column}: not valid UTF-8 (byte {data[e.start]:#04x}); convert the file '
                        'to UTF-8 or leave it out') from None


def _open(path: str):
    try:
        return open(path, 'rb')
    except OSError as e:
        raise PrepError(f'{path}: cannot read: {e.strerror or e}') from None


def _text_documents(path: str) -> Iterator[Document]:
    with _open(path) as f:
        try:
            data = f.read()
        except OSError as e:  # a folder named like a file, a vanished network mount ...
            raise PrepError(f'{path}: cannot read: {e.strerror or e}') from None
    yield Document(_decode(data, path), path)


def _jsonl_documents(path: str, field: str) -> Iterator[Document]:
    with _open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f'{path}:{lineno}'
            if not raw.strip():
                continue
            try:
                record = json.loads(_decode(raw, path, lineno))
            except json.JSONDecodeError as e:
                # Some of json's messages end in "at" ("Unterminated string starting at"): no second one.
                raise PrepError(f'{where}: invalid JSON ({e.msg.removesuffix(" at")} at column {e.colno})') from None
            if not isinstance(record, dict):
                raise PrepError(f'{where}: expected a JSON object with a {field!r} field, got '
                                f'{type(record).__name__}')
            if field not in record:
                raise PrepError(f'{where}: no field {field!r} (fields: {sorted(record)}); choose one with '
                                '--text-field')
            text = record[field]
            if not isinstance(text, str):
                raise PrepError(f'{where}: field {field!r} must be a string, got {type(text).__name__}')
            yield Document(text, where)


def _hf_documents(path: str, field: str, split: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise PrepError(f'{path}: reading a Hugging Face dataset needs the datasets package (pip install datasets)')
    try:
        ds = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise PrepError(f'{path}: not a dataset saved with save_to_disk: {e}') from None
    name = path
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PrepError(f'{path}: --split ({split!r}) is not one of the dataset\'s splits {sorted(ds)}')
        ds, name = ds[split], f'{path}[{split}]'
    if field not in ds.column_names:
        raise PrepError(f'{name}: no column {field!r} (columns: {ds.column_names}); choose one with --text-field')
    row = 0
    for batch in ds.select_columns([field]).iter(batch_size=1000):
        for text in batch[field]:
            if not isinstance(text, str):
                raise PrepError(f'{name} row {row}: column {field!r} must be a string, got {type(text).__name__}')
            yield Document(text, f'{name} row {row}')
            row += 1


def _is_hf_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, n)) for n in ('dataset_info.json', 'dataset_dict.json', 'state.json'))


def _files_under(path: str) -> list[str]:
    files = []
    for folder, subfolders, names in os.walk(path):
        # Hidden files and folders (.git, editor backups) are not documents.
        subfolders[:] = sorted(d for d in subfolders if not d.startswith('.'))
        files.extend(os.path.join(folder, n) for n in sorted(names) if not n.startswith('.'))
    return files


class _Source(NamedTuple):
    kind: str  # text, jsonl, hf
    path: str


def _plan_sources(cfg: PrepConfig) -> list[_Source]:
    """Every input resolved to (format, path), in a fixed order, before anything is read."""
    if cfg.default:
        return [_Source('text', f) for f in default_corpus_files(cfg.max_files)]
    sources: list[_Source] = []
    for path in cfg.inputs:
        if not os.path.exists(path):
            raise PrepError(f'input {path}: no such file or folder')
        if cfg.format == 'hf' or (cfg.format == 'auto' and _is_hf_dataset(path)):
            sources.append(_Source('hf', path))
            continue
        files = _files_under(path) if os.path.isdir(path) else [path]
        if not files:
            raise PrepError(f'input {path}: the folder holds no files')
        for f in files:
            kind = cfg.format if cfg.format != 'auto' else ('jsonl' if f.endswith('.jsonl') else 'text')
            sources.append(_Source(kind, f))
    if cfg.max_files is not None:
        sources = sources[:cfg.max_files]
    return sources


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # unreadable files are reported when they are read
        return 0


def _documents(cfg: PrepConfig, sources: Sequence[_Source], counts: PrepSummary) -> Iterator[Document]:
    for source in sources:
        if source.kind != 'hf':
            counts.input_bytes_read += _file_size(source.path)
        if source.kind == 'hf':
            yield from _hf_documents(source.path, cfg.text_field, cfg.split)
        elif source.kind == 'jsonl':
            yield from _jsonl_documents(source.path, cfg.text_field)
        elif cfg.default:
            # The default corpus must build on any interpreter: a stray non-UTF-8 file is skipped, not fatal.
            try:
                yield from _text_documents(source.path)
            except PrepError as e:
                log.info('--default: skipping %s', e)
                counts.undecodable_files += 1
        else:
            yield from _text_documents(source.path)


# ------------------------------------------------------------------------------------------------- tokenization

_worker_encoding = None


def _init_worker() -> None:
    # Ctrl-C reaches the whole process group; the parent handles it (and stops the pool). A worker killed by it
    # instead breaks the pool under the parent's feet (see _encoded). The worker was born with SIGINT blocked
    # (_submit): from now on it is ignored, and one that came in between is dropped.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, 'pthread_sigmask'):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    global _worker_encoding
    _worker_encoding = load_cl100k_encoding()


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    # encode_ordinary: a document that contains the text "<|endoftext|>" gets ordinary tokens for it, so only
    # our separators carry id 100257.
    return [np.asarray(_worker_encoding.encode_ordinary(t), dtype=np.int32) for t in texts]


def _batches(docs: Iterator[Document], counts: PrepSummary) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        if not doc.text:
            counts.empty_documents += 1
            continue
        batch.append(doc.text)
        chars += len(doc.text)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _submit(pool: ProcessPoolExecutor, batch: list[str]) -> Future:
    # submit() may start worker processes. Until a worker's initializer runs (after fork hooks, or a fresh
    # interpreter's start-up) Ctrl-C would kill it with a traceback: SIGINT is blocked in this thread meanwhile, and
    # the workers inherit the block. That is not enough for this process: the kernel then hands SIGINT to another
    # thread (the pool's manager, tqdm's monitor), and Python runs the handler in this thread at its next bytecode,
    # possibly inside a fork hook (logging's _releaseLock), where a KeyboardInterrupt is reported and dropped: the
    # run went on to the end (seen in CI). So while submitting, the handler only records the signal; it is acted on
    # once submit() has returned.
    if not hasattr(signal, 'pthread_sigmask') or threading.current_thread() is not threading.main_thread():
        return pool.submit(_encode_batch, batch)
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(_encode_batch, batch)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGINT, previous)
        if pending:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


def _encoded(batches: Iterator[list[str]], workers: int) -> Iterator[list[np.ndarray]]:
    """Token arrays batch by batch, in input order; with ``workers > 1`` up to ``2 * workers`` batches in flight."""
    if workers == 1:
        _init_worker()
        for batch in batches:
            yield _encode_batch(batch)
        return
    pool = ProcessPoolExecutor(workers, initializer=_init_worker)
    pending: collections.deque[Future] = collections.deque()
    try:
        for batch in batches:
            pending.append(_submit(pool, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # On any early exit (Ctrl-C, a bad input line, --max-tokens) the batches in flight, at most 2 * workers of
        # about 1 MB of text, are left to finish rather than cancelled: when a worker has died (a Ctrl-C that came
        # before it could ignore it), Python 3.11's pool sets an error on every pending future, a cancelled one
        # makes that raise InvalidStateError in its manager thread, and shutdown() then waits forever: the hang
        # seen on Ctrl-C (CPython gh-107219, fixed in 3.12; also gh-94440).
        pending.clear()
        pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------------------- output

class _SampleWriter:
    """Cuts the token stream into samples and sends each to train or val.

    Sample ``i`` goes to val when fewer than ``val_fraction * i`` samples went there before: deterministic, about
    ``val_fraction`` of the samples, and val is never empty once there are two samples.
    """

    def __init__(self, folder: str, cfg: PrepConfig):
        from streaming import MDSWriter

        self.cfg = cfg
        self.writers = {s: MDSWriter(out=os.path.join(folder, s), columns=MDS_COLUMNS, compression=cfg.compression,
                                     hashes=MDS_HASHES, size_limit=cfg.shard_size) for s in cfg.splits}
        self.samples = {s: 0 for s in SPLITS}
        self.carry = np.zeros(0, dtype=np.int32)

    def add(self, tokens: np.ndarray) -> None:
        seq = self.cfg.max_seq_len
        stream = np.concatenate([self.carry, tokens]) if self.carry.size else tokens
        n = stream.size // seq
        for i in range(n):
            total = self.samples['train'] + self.samples['val']
            split = 'val' if self.samples['val'] < self.cfg.val_fraction * total else 'train'
            self.writers[split].write({'tokens': stream[i * seq:(i + 1) * seq]})
            self.samples[split] += 1
        self.carry = stream[n * seq:].copy()

    def finish(self) -> None:
        for writer in self.writers.values():
            writer.finish()

    def abandon(self) -> None:
        for writer in self.writers.values():
            writer.cancel_future_jobs()


def _uploaders(folder: str, out: str, splits: Sequence[str]) -> dict:
    """One Streaming uploader per split, made before any shard is written: a missing bucket, bad credentials or an
    unreachable endpoint fail here, before the work."""
    from streaming.base.storage.upload import CloudUploader

    uploaders = {}
    for split in splits:
        remote = f'{out.rstrip("/")}/{split}'
        try:
            uploaders[split] = CloudUploader.get((os.path.join(folder, split), remote), keep_local=True)
        except Exception as e:  # bad scheme, missing bucket, no credentials, no endpoint
            raise PrepError(redact(f'--out {out}: cannot write to {remote}: {type(e).__name__}: {e} (for s3:// check '
                                   'the bucket, S3_ENDPOINT_URL and the AWS_* credentials)')) from None
    return uploaders


def _check_other_remote(uploader: Any, out: str) -> None:
    """Object stores other than S3: a new dataset only (replacing one without a moment of mixed data needs the
    conditional writes and deletes that :class:`S3Output` uses)."""
    try:
        existing = uploader.list_objects(INDEX)
    except NotImplementedError:  # stores whose uploader cannot list: nothing to check against
        existing = []
    except Exception as e:
        raise PrepError(redact(f'--out {out}: cannot list train/{INDEX}: {type(e).__name__}: {e}')) from None
    if existing:
        raise PrepError(f'--out {out} already holds a dataset (train/{INDEX}); replacing a dataset is supported on '
                        's3:// only: remove it first or choose another prefix')


def _upload(folder: str, out: str, uploaders: dict) -> None:
    # Shards first, index.json last (train's the very last): a reader never finds an index whose shards are not
    # all there.
    order = [(s, n) for s in uploaders for n in sorted(os.listdir(os.path.join(folder, s))) if n != INDEX]
    order += [(s, INDEX) for s in reversed(list(uploaders))]
    for split, name in order:
        try:
            uploaders[split].upload_file(name)
        except Exception as e:
            raise PrepError(redact(f'uploading {split}/{name} to {out} failed: {type(e).__name__}: {e}; the remote '
                                   f'dataset is incomplete (no new {split}/{INDEX}): run prep-data again')) from None


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(folder) for n in names)


def _shard_count(folder: str) -> int:
    with open(os.path.join(folder, INDEX)) as f:
        return len(json.load(f)['shards'])


def _tokenize_into(writer: _SampleWriter, cfg: PrepConfig, sources: Sequence[_Source], summary: PrepSummary) -> None:
    """Reads, tokenizes and writes every document (each followed by <|endoftext|>), up to ``--max-tokens``."""
    from tqdm import tqdm

    eot = np.array([ENDOFTEXT_ID], dtype=np.int32)
    cap = cfg.max_tokens if cfg.max_tokens is not None else float('inf')
    total = len(sources) if all(s.kind == 'text' for s in sources) else None  # documents, when known up front
    with tqdm(total=total, unit='doc', desc='prep-data', disable=not cfg.progress, file=sys.stderr) as bar:
        def counted(docs: Iterator[Document]) -> Iterator[Document]:
            for doc in docs:
                bar.update(1)
                yield doc

        batches = _batches(counted(_documents(cfg, sources, summary)), summary)
        with contextlib.closing(_encoded(batches, cfg.workers)) as encoded:
            for batch in encoded:
                summary.tokens_encoded += sum(t.size + 1 for t in batch)
                for tokens in batch:
                    if summary.tokens >= cap:
                        return
                    writer.add(np.concatenate([tokens, eot]))
                    summary.documents += 1
                    summary.tokens += tokens.size + 1
                bar.set_postfix(tokens=f'{summary.tokens:,}', refresh=False)


def _input_paths(cfg: PrepConfig) -> list[str]:
    return [sysconfig.get_paths()['stdlib']] if cfg.default else list(cfg.inputs)


def _build(folder: str, cfg: PrepConfig, sources: Sequence[_Source], summary: PrepSummary) -> None:
    """Writes the dataset into ``folder`` (``train/``, ``val/``); fills in ``summary``."""
    writer = _SampleWriter(folder, cfg)
    try:
        _tokenize_into(writer, cfg, sources, summary)
        summary.samples = dict(writer.samples)
        summary.dropped_tail_tokens = int(writer.carry.size)
        inputs = 'the default corpus' if cfg.default else ', '.join(cfg.inputs)
        if summary.documents == 0:
            raise PrepError(f'empty input: {inputs} gave no documents with text '
                            f'({summary.empty_documents} empty, {summary.undecodable_files} not UTF-8)')
        n_samples = summary.samples['train'] + summary.samples['val']
        if summary.samples['train'] == 0 or (cfg.val_fraction > 0 and summary.samples['val'] == 0):
            need = 'a train and a val split need at least 2' if cfg.val_fraction > 0 else 'training needs 1'
            raise PrepError(f'{inputs}: {summary.tokens} tokens make {n_samples} samples of --max-seq-len '
                            f'{cfg.max_seq_len}; {need} (give more text or lower --max-seq-len)')
        writer.finish()
        writer = None
    finally:
        if writer is not None:
            writer.abandon()
    summary.shards.update({s: _shard_count(os.path.join(folder, s)) for s in cfg.splits})
    summary.bytes = _folder_bytes(folder)


def _needed_bytes(folder: str, cfg: PrepConfig, sources: Sequence[_Source], summary: PrepSummary):
    """A function estimating, when the disk fills, the bytes the whole output needs: the tokens encoded so far,
    scaled by the share of the input read, times the bytes per token written so far (4, an int32, plus the MDS
    overhead, before the first document is complete). None when the input size is unknown (saved datasets)."""
    if any(s.kind == 'hf' for s in sources):
        return lambda: None

    def estimate() -> Optional[int]:
        if not summary.input_bytes_read or not summary.tokens_encoded:
            return None
        total = sum(_file_size(s.path) for s in sources)
        tokens = summary.tokens_encoded * max(1.0, total / summary.input_bytes_read)
        if cfg.max_tokens is not None:
            tokens = min(tokens, cfg.max_tokens)
        written = _folder_bytes(folder) if os.path.isdir(folder) else 0
        per_token = written / summary.tokens if summary.tokens and written else 4 * (1 + 2 / cfg.max_seq_len)
        return int(tokens * per_token)

    return estimate


def _prep_local(cfg: PrepConfig, summary: PrepSummary) -> None:
    estimate = [lambda: None]  # set once the output folder exists; atomic_output calls it if the disk fills
    try:
        with atomic_output(cfg.out, command=COMMAND, overwrite=cfg.overwrite, is_dir=True, inputs=_input_paths(cfg),
                           inputs_contain_out=True, option='--out', needed_bytes=lambda: estimate[0]()) as folder:
            sources = _plan_sources(cfg)
            estimate[0] = _needed_bytes(str(folder), cfg, sources, summary)
            _build(str(folder), cfg, sources, summary)
    except OutputError as e:
        raise PrepError(str(e)) from None


def _prep_remote(cfg: PrepConfig, summary: PrepSummary) -> None:
    # Shards are staged in a hidden folder under --tmp-dir, named like the temporaries of a local output, so that
    # those of dead runs are found and removed.
    parent = Path(cfg.tmp_dir or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    stage = parent / COMMAND
    with output_lock(stage):
        clean_stale_temporaries(stage)
    folder = temporary_sibling(stage)
    folder.mkdir()  # mkdir, not mkdtemp: the umask's permissions, as for a local output
    try:
        # One uploader checks the bucket and the credentials before any work; S3 needs no more (its client does
        # the rest), other stores get one per split.
        is_s3 = cfg.out.startswith('s3://')
        uploaders = _uploaders(str(folder), cfg.out, ('train',) if is_s3 else cfg.splits)
        client = getattr(uploaders['train'], 's3', None) if is_s3 else None
        s3 = S3Output(cfg.out, client, COMMAND) if client is not None else None
        with s3.lock() if s3 is not None else contextlib.nullcontext():
            if s3 is not None:
                old = s3.check(cfg.overwrite)
            else:
                _check_other_remote(uploaders['train'], cfg.out)
            sources = _plan_sources(cfg)
            with disk_full_as_error(folder, _needed_bytes(str(folder), cfg, sources, summary),
                                    cleanup=lambda: shutil.rmtree(folder, ignore_errors=True)):
                _build(str(folder), cfg, sources, summary)
                write_marker(folder, COMMAND)
            if s3 is not None:
                s3.publish(str(folder), cfg.splits, old)
            else:
                _upload(str(folder), cfg.out, uploaders)
    except (RemoteError, OutputError) as e:
        raise PrepError(str(e)) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prep_data(cfg: PrepConfig) -> PrepSummary:
    """Tokenizes ``cfg``'s inputs into ``cfg.out/{train,val}``; returns the summary. Raises :class:`PrepError`.

    ``--overwrite`` replaces only an earlier output of prep-data (recognised by its marker) holding nothing else;
    ``OUT`` may not be, hold or lie inside an input; two runs cannot write the same ``OUT`` at once."""
    # Streaming takes ~10 s to import (it pulls in torchvision and transformers): not part of the measured time.
    import streaming  # noqa: F401

    start = time.time()
    summary = PrepSummary(out=cfg.out)
    if cfg.remote:
        _prep_remote(cfg, summary)
    else:
        _prep_local(cfg, summary)
    summary.seconds = time.time() - start
    return summary


# ------------------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``foundry-dbrx prep-data``."""
    parser.add_argument('inputs', nargs='*', metavar='INPUT',
                        help='text files or folders of them, JSONL files (*.jsonl), or a datasets save_to_disk folder')
    parser.add_argument('--default', action='store_true',
                        help='the embedded corpus: this Python\'s standard library sources (about 3M tokens)')
    parser.add_argument('--out', required=True, help='output folder, or a URL Streaming writes (s3://bucket/prefix)')
    parser.add_argument('--format', default='auto', choices=INPUT_FORMATS,
                        help='auto: save_to_disk folders are datasets, *.jsonl is JSONL, anything else is text')
    parser.add_argument('--text-field', default='text', help='JSONL field / dataset column with the text')
    parser.add_argument('--split', default='train', help='which split of a saved DatasetDict to read')
    parser.add_argument('--max-seq-len', type=int, default=128,
                        help='tokens per sample; match the YAML\'s max_seq_len (128 = yamls/dbrx-tiny.yaml)')
    parser.add_argument('--val-fraction', type=float, default=0.01, help='share of samples held out in OUT/val')
    parser.add_argument('--max-tokens', type=int, default=None, help='stop after the document reaching this many tokens')
    parser.add_argument('--max-files', type=int, default=None, help='read at most this many files')
    parser.add_argument('--shard-size', default='64mb', help='shard size limit (bytes, or 64mb, 512kb ...)')
    parser.add_argument('--compression', default=None, help='shard compression Streaming knows (zstd, gz ...)')
    parser.add_argument('--workers', type=int, default=default_workers(),
                        help='tokenizer processes (default: 2, or 1 where this process may use one core only)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace a dataset that prep-data wrote at --out (recognised by its marker file); '
                             'nothing else is ever replaced or deleted')
    parser.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bar')
    parser.add_argument('--tmp-dir', default=None,
                        help='where shards are staged before an upload (default: the system temp folder)')


def run(args: argparse.Namespace) -> int:
    """Runs ``prep-data``; a bad input or option prints one error line and returns 1, Ctrl-C one line and 130."""
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    from foundry_dbrx.cli import ctrl_c_exits, freeze_imports
    try:
        with ctrl_c_exits('foundry-dbrx prep-data: interrupted while starting; nothing was written'):
            import streaming  # noqa: F401  (seconds: it imports torch, transformers and more)
        freeze_imports()
        values: dict[str, Any] = {f.name: getattr(args, f.name) for f in dataclasses.fields(PrepConfig)}
        values['inputs'] = tuple(values['inputs'])
        summary = prep_data(PrepConfig(**values))
    except (PrepError, OutputError, OSError) as e:  # one line naming the file, no traceback
        message = f'{e.filename}: {e.strerror}' if isinstance(e, OSError) and e.filename else str(e)
        print(f'foundry-dbrx prep-data: error: {redact(message)}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # prep_data removed its staging folder on the way out; nothing was installed at --out.
        print(f'\nfoundry-dbrx prep-data: interrupted before {args.out} was written; the partial output was removed',
              file=sys.stderr)
        return 130
    print('\n'.join(summary.lines()), flush=True)
    return 0
