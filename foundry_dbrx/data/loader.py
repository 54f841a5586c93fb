"""``dbrx_text``: LLM Foundry's ``text`` dataloader, except that a shard it cannot get stops the run.

Streaming 0.12 downloads shards in background threads. When one fails for good (a checksum mismatch under
``validate_hash``, an object missing from the bucket, a store still unreachable after ``download_retry`` attempts),
the thread only sets an event, and the sample loop, seeing it, ends quietly: the epoch stops early with the rest of
its samples skipped, and the error surfaces, as "Background thread failed. Check other traceback.", only when the
next epoch starts, or never if that was the last one. :class:`StrictStreamingTextDataset` keeps the thread's
exception and raises it, naming the shard, where the epoch would otherwise have ended early.

A YAML selects it with ``train_loader.name: dbrx_text`` (and the same for ``eval_loader``); every other key is the
``text`` loader's (``remote``, ``local``, ``split``, ``download_retry``, ``download_timeout``, ``validate_hash``,
``cache_limit``, ``predownload``, ``shuffle``, ``shuffle_seed`` ...).
"""

from __future__ import annotations

import inspect
import os
import random
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Optional, Union

from llmfoundry.data.text_data import StreamingTextDataset

from foundry_dbrx.data.remote import redact

__all__ = ['ShardUnavailableError', 'StrictStreamingTextDataset', 'build_dbrx_text_dataloader']


class ShardUnavailableError(RuntimeError):
    """A shard could not be downloaded or failed its hash check; training stops rather than skip samples."""


_CHECKSUM_FAILURE = 'Checksum failure: '
_SHM_ATTEMPTS = 5


def _single_process() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1


class StrictStreamingTextDataset(StreamingTextDataset):
    """A ``StreamingTextDataset`` whose download failures stop the epoch with an error naming the shard.

    Three Streaming 0.12 behaviours are covered, by overriding the methods involved (its internals: revisit
    when the pin on mosaicml-streaming 0.12.x moves):

    1. A failed background download ends the epoch early and silently (see the module docstring).
    2. A shard whose background download failed stays ``PREPARING`` for good, and ``prepare_shard(blocking=True)``
       waits for it to leave that state without looking at the failure event: the run hangs instead of failing
       (seen with an object store that went away for good). Here the wait checks for the failure.
    3. The end of an epoch waits until the prepare and ready threads have both said they exited, which a thread
       that died of an exception never says: another hang. Here they say it on the way out.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        for attempt in range(_SHM_ATTEMPTS):
            try:
                super().__init__(*args, **kwargs)
                break
            except FileExistsError as e:
                # Streaming picks its shared-memory prefix by looking for a free one and then creating it: two
                # processes starting together (two runs, or tests, on one machine) can pick the same one, and the
                # slower one fails (mosaicml/streaming#884, open). Looking again finds the next free prefix. Only a
                # lone process retries: with several ranks, the barriers inside the lookup would fall out of step.
                if attempt + 1 == _SHM_ATTEMPTS or not _single_process() or not str(e.filename).endswith('_locals'):
                    raise
                time.sleep(0.05 + 0.2 * random.random())
        self._background_error: Optional[BaseException] = None

    def on_exception(self, future: Future) -> None:
        error = future.exception()
        if error is not None and self._background_error is None:
            self._forget_bad_copy(error)
            self._background_error = error
        super().on_exception(future)

    def _forget_bad_copy(self, error: BaseException) -> None:
        # Streaming checks hashes only when it downloads: a corrupt file left in the cache would be read, unchecked,
        # by the next run, even after the remote copy is fixed. Only a copy that can be fetched again goes: a stream
        # without a remote (remote: null) reads the dataset itself, and its files are the only copy.
        message = str(error)
        if isinstance(error, ValueError) and message.startswith(_CHECKSUM_FAILURE):
            path = os.path.realpath(message[len(_CHECKSUM_FAILURE):])
            caches = [os.path.realpath(s.local) for s in self.streams
                      if s.remote and os.path.realpath(s.remote) != os.path.realpath(s.local)]
            if os.path.isfile(path) and any(path.startswith(c + os.sep) for c in caches):
                os.remove(path)

    def _failure(self, error: BaseException) -> ShardUnavailableError:
        where = ', '.join(f'{s.remote or s.local}/{s.split or ""}'.rstrip('/') for s in self.streams)
        return ShardUnavailableError(redact(f'streaming {where} failed, so training stops instead of skipping '
                                            f'samples: {type(error).__name__}: {error}'))

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        from streaming.base.constant import TICK
        from streaming.base.dataset import _ShardState

        super().prepare_shard(shard_id, False)  # downloads here if nobody else is; never waits
        while blocking and self._shard_states[shard_id] == _ShardState.PREPARING:
            if self._background_error is not None:
                raise self._failure(self._background_error) from self._background_error
            time.sleep(TICK)

    @staticmethod
    def _note_exit_on_error(thread: Callable[[Any], None], it: Any) -> None:
        try:
            thread(it)
        except BaseException:
            it.on_exit()  # the normal return path does this itself
            raise

    def _prepare_thread(self, it: Any) -> None:
        self._note_exit_on_error(super()._prepare_thread, it)

    def _ready_thread(self, it: Any) -> None:
        self._note_exit_on_error(super()._ready_thread, it)

    def __iter__(self) -> Iterator[Any]:
        _stop_at_exit(self)
        try:
            yield from super().__iter__()
        except ShardUnavailableError:
            raise
        except Exception as error:  # a download in this thread (botocore, hash check) names the shard
            self._forget_bad_copy(error)
            raise self._failure(self._background_error or error) from error
        if self._background_error is not None:
            raise self._failure(self._background_error) from self._background_error


# Datasets that may have background threads running, for _stop_background_threads.
_LIVE_DATASETS: 'weakref.WeakSet[StrictStreamingTextDataset]' = weakref.WeakSet()
_AT_EXIT_REGISTERED = False


def _stop_at_exit(dataset: StrictStreamingTextDataset) -> None:
    global _AT_EXIT_REGISTERED
    _LIVE_DATASETS.add(dataset)
    if not _AT_EXIT_REGISTERED:
        # Streaming 0.12's ready thread waits for a shard to become local in a loop that checks only the dataset's
        # failure event, not its iterator's exit flag (streaming/base/dataset.py, StreamingDataset._ready_thread).
        # When an epoch is abandoned while a shard is PREPARING (a download another process started, an iteration
        # stopped early), that loop never ends, and at interpreter exit concurrent.futures joins the executor's
        # threads: the process hangs after its work is done (seen at the end of a test session). Setting the event
        # at exit ends both background threads. threading's atexit hooks run in reverse order of registration,
        # before the joins; this one is registered after concurrent.futures.thread's (imported with streaming),
        # so it runs first. threading._register_atexit is what Streaming itself uses for its iterators.
        threading._register_atexit(_stop_background_threads)  # pyright: ignore[reportAttributeAccessIssue]
        _AT_EXIT_REGISTERED = True


def _stop_background_threads() -> None:
    for dataset in list(_LIVE_DATASETS):
        event = getattr(dataset, '_event', None)
        if event is not None:
            event.set()


def build_dbrx_text_dataloader(
    tokenizer: Any,
    device_batch_size: Union[int, float],
    dataset: dict[str, Any],
    drop_last: bool,
    num_workers: int,
    pin_memory: bool = True,
    prefetch_factor: Optional[int] = 2,
    persistent_workers: bool = True,
    timeout: int = 0,
):
    """Builds the ``dbrx_text`` loader: the steps of LLM Foundry's ``text`` loader with the strict dataset."""
    from llmfoundry import registry
    from llmfoundry.data.text_data import build_streams
    from llmfoundry.utils.registry_utils import construct_from_registry
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    if tokenizer is None:
        raise ValueError('the dbrx_text dataloader needs a tokenizer (the YAML\'s tokenizer section)')
    dataset_cfg = dict(dataset)
    dataset_cfg['replication'], dataset_batch_size = construct_from_registry(
        name='dataset_replication_validator', registry=registry.dataset_replication_validators,
        partial_function=False,
        kwargs={'dataset_cfg': dataset_cfg, 'tokenizer': tokenizer, 'device_batch_size': device_batch_size})
    streams = build_streams(streams=dataset_cfg.pop('streams', None))
    # Keys meant for the collator (eos_token_id, bos_token_id ...) stay in dataset_cfg for it; the dataset gets the
    # ones it takes, as in the text loader.
    accepted = set(inspect.signature(StreamingTextDataset).parameters) | set(
        inspect.signature(StreamingDataset).parameters)
    text_dataset = StrictStreamingTextDataset(
        tokenizer=tokenizer, streams=streams, batch_size=dataset_batch_size,
        **{k: v for k, v in dataset_cfg.items() if k in accepted and k not in ('tokenizer', 'streams', 'batch_size')})
    loader_cfg = {'name': 'dbrx_text', 'dataset': dataset_cfg, 'drop_last': drop_last, 'num_workers': num_workers,
                  'pin_memory': pin_memory, 'prefetch_factor': prefetch_factor,
                  'persistent_workers': persistent_workers, 'timeout': timeout}
    collate_fn, loader_batch_size = construct_from_registry(
        name='text_collator', registry=registry.collators, partial_function=False,
        kwargs={'dataloader_cfg': loader_cfg, 'tokenizer': tokenizer, 'dataset_batch_size': dataset_batch_size})
    dl = DataLoader(text_dataset, collate_fn=collate_fn, batch_size=loader_batch_size, drop_last=drop_last,
                    num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                    persistent_workers=persistent_workers, timeout=timeout)
    return construct_from_registry(name='data_spec', registry=registry.data_specs, partial_function=False,
                                   kwargs={'dl': dl, 'dataset_cfg': dataset_cfg})
