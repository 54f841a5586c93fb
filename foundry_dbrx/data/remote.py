"""``prep-data --out s3://bucket/prefix``: publishing a dataset to object storage so that a reader never sees a mix.

A reader (Streaming, through ``dbrx_text`` or LLM Foundry's ``text`` loader) takes ``<split>/index.json`` and then
fetches the shards it names. So a dataset is replaced in this order, and a failure at any step (an upload refused,
the store gone, the process killed) leaves the old dataset whole or no dataset, never a mix:

1. the old ``val/index.json`` goes first (a val reader gets a clear "no index" error, never old val beside new
   train; the old val is gone for good when the new dataset has no val split);
2. the new shards are uploaded under names no old index uses (``<tag>.shard.00000.mds``), so a reader holding the
   old index, or a cache of old shards, never reads a new shard in an old one's place;
3. ``train/index.json`` is replaced (one PUT: readers see the old index or the new one), then the new
   ``val/index.json`` is uploaded;
4. the old shards are deleted, and the marker is made to list only the new objects.

A marker listing the old and the new objects goes up before step 1, so that whatever a failure leaves behind is
recognised, by the next run, as prep-data's own.

Before any of that a lock object (``.foundry-dbrx.lock``, created with ``If-None-Match: *`` so that only one
writer can create it) keeps two prep-data runs from writing the same prefix, and what is already there is checked
as for a local folder: ``--overwrite`` replaces only an earlier prep-data output (its marker lists every object it
wrote) and never deletes an object it did not write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from foundry_dbrx.outputs import MARKER, marker_text, pid_alive, write_marker

__all__ = ['redact', 'S3Output', 'INDEX']

log = logging.getLogger(__name__)

INDEX = 'index.json'
LOCK = '.foundry-dbrx.lock'

_USERINFO = re.compile(r'(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s"\']+@')
_SECRET_PARAMS = re.compile(r'(?P<name>X-Amz-(?:Credential|Signature|Security-Token)|AWSAccessKeyId|Signature|'
                            r'sig|token)=[^&\s"\']+', re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with credentials removed from any URL in it: the ``user:password@`` part and signed-URL
    parameters (``X-Amz-Credential=``, ``X-Amz-Signature=`` ...). Error messages quote endpoint URLs, and an
    ``S3_ENDPOINT_URL`` such as ``http://key:secret@minio:9000`` would otherwise end up in logs."""
    text = _USERINFO.sub(lambda m: f'{m["scheme"]}***@', str(text))
    return _SECRET_PARAMS.sub(lambda m: f'{m["name"]}=***', text)


class RemoteError(ValueError):
    """The remote output cannot be written as asked; prep-data turns it into a PrepError."""


def _error_code(error: BaseException) -> str:
    return str(getattr(error, 'response', {}).get('Error', {}).get('Code', ''))


class S3Output:
    """An ``s3://bucket/prefix`` output, through the boto3 client of Streaming's uploader (same endpoint and
    credentials)."""

    def __init__(self, out: str, client: Any, command: str = 'prep-data'):
        url = urllib.parse.urlparse(out)
        self.out = out.rstrip('/')
        self.bucket, self.prefix = url.netloc, url.path.strip('/')
        self.s3 = client
        self.command = command
        self._swapped = False  # whether a new train/index.json is in place (for the error message)

    def key(self, name: str) -> str:
        return f'{self.prefix}/{name}' if self.prefix else name

    def _fail(self, what: str, error: BaseException) -> RemoteError:
        return RemoteError(redact(f'--out {self.out}: {what}: {type(error).__name__}: {error}'))

    # ---------------------------------------------------------------------------------------------------- lock
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Holds ``OUT/.foundry-dbrx.lock`` for the block. A lock left by a dead process of this host is replaced
        (and reported); any other one is an error saying who holds it and how to remove it."""
        body = json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.time()}).encode()
        locked = False
        for attempt in range(2):
            try:
                self.s3.put_object(Bucket=self.bucket, Key=self.key(LOCK), Body=body, IfNoneMatch='*')
                locked = True
                break
            except Exception as e:
                code = _error_code(e)
                if code in ('NotImplemented', '501'):
                    # Stores without conditional writes (older MinIO, Ceph): no lock, as before it existed.
                    log.warning('%s: the store does not support conditional writes (If-None-Match), so nothing '
                                'keeps another prep-data from writing this prefix at the same time', self.out)
                    break
                if code not in ('PreconditionFailed', '412', 'ConditionalRequestConflict'):
                    raise self._fail(f'cannot create the lock object {LOCK}', e) from None
                holder = self._read_json(LOCK) or {}
                if attempt == 0 and holder.get('host') == socket.gethostname() and not pid_alive(holder.get('pid')):
                    log.warning('%s/%s: removed, left by process %s, which died', self.out, LOCK, holder.get('pid'))
                    self._delete([self.key(LOCK)])
                    continue
                since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))
                raise RemoteError(f'--out {self.out} is being written by another prep-data (pid {holder.get("pid")} '
                                  f'on {holder.get("host")}, since {since}); if that process is gone, delete '
                                  f'{self.out}/{LOCK}') from None
        try:
            yield
        finally:
            if locked:
                with contextlib.suppress(Exception):
                    self._delete([self.key(LOCK)])

    # ------------------------------------------------------------------------------------------------- reading
    def _read_json(self, name: str) -> Optional[dict]:
        try:
            data = self.s3.get_object(Bucket=self.bucket, Key=self.key(name))['Body'].read()
            value = json.loads(data)
        except Exception:
            return None
        return value if isinstance(value, dict) else None

    def list(self) -> list[str]:
        """Every object under the prefix, as names relative to it."""
        start = self.key('')
        try:
            pages = self.s3.get_paginator('list_objects_v2').paginate(Bucket=self.bucket, Prefix=start)
            return sorted(obj['Key'][len(start):] for page in pages for obj in page.get('Contents', []))
        except Exception as e:
            raise self._fail('cannot list it', e) from None

    def check(self, overwrite: bool) -> list[str]:
        """What an overwrite will replace (names relative to the prefix; empty when there is nothing), after the
        same rules as a local ``--out``. The remains of an interrupted run (its marker, no ``train/index.json``)
        hold no dataset anyone can read, and are replaced without ``--overwrite``."""
        names = [n for n in self.list() if n != LOCK]
        if not names:
            return []
        marker = self._read_json(MARKER)
        ours = None
        if marker is not None and marker.get('written_by') == f'foundry-dbrx {self.command}':
            ours = set(marker.get('files') or ()) | {MARKER}
        foreign = [n for n in names if ours is None or n not in ours]
        listed = ', '.join(foreign[:5]) + (f' and {len(foreign) - 5} more' if len(foreign) > 5 else '')
        if ours is None:
            what = (f'already holds a dataset (train/{INDEX}) that this prep-data did not mark as its own (no '
                    f'{MARKER}; an older prep-data wrote it, or another tool)' if f'train/{INDEX}' in names else
                    f'holds {len(names)} object(s) that prep-data did not write ({listed})')
            raise RemoteError(f'--out {self.out} {what}; choose another prefix or remove them yourself')
        if foreign:
            raise RemoteError(f'--out {self.out} holds an earlier prep-data dataset plus {len(foreign)} object(s) it '
                              f'did not write ({listed}); --overwrite would delete them: choose another prefix or '
                              'remove them yourself')
        if f'train/{INDEX}' not in names:
            log.warning('%s: replacing the %d object(s) an interrupted prep-data left (no train/%s)', self.out,
                        len(names), INDEX)
        elif not overwrite:
            raise RemoteError(f'--out {self.out} already holds a dataset (train/{INDEX}); pass --overwrite to '
                              'replace it')
        return names

    # ------------------------------------------------------------------------------------------------- writing
    def _put(self, local: str, name: str) -> None:
        extra = {'ACL': os.environ['S3_CANNED_ACL']} if os.environ.get('S3_CANNED_ACL') else {}
        try:
            self.s3.upload_file(local, self.bucket, self.key(name), ExtraArgs=extra)
        except Exception as e:
            raise self._fail(f'uploading {name} failed', e) from None

    def _put_bytes(self, data: bytes, name: str) -> None:
        extra = {'ACL': os.environ['S3_CANNED_ACL']} if os.environ.get('S3_CANNED_ACL') else {}
        try:
            self.s3.put_object(Bucket=self.bucket, Key=self.key(name), Body=data, **extra)
        except Exception as e:
            raise self._fail(f'uploading {name} failed', e) from None

    def _delete(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = keys[start:start + 1000]
            try:
                response = self.s3.delete_objects(Bucket=self.bucket,
                                                  Delete={'Objects': [{'Key': k} for k in chunk], 'Quiet': True})
            except Exception as e:
                raise self._fail(f'deleting {chunk[0]} failed', e) from None
            errors = response.get('Errors') or []
            if errors:
                raise RemoteError(redact(f'--out {self.out}: could not delete {errors[0].get("Key")}: '
                                         f'{errors[0].get("Message")}'))

    def publish(self, folder: str, splits: Sequence[str], old: Sequence[str]) -> None:
        """Uploads the dataset staged in ``folder`` (``<split>/`` folders and the marker); ``old``: the objects of
        the dataset it replaces (from :meth:`check`). The order is the module docstring's."""
        try:
            self._publish(folder, splits, old)
        except RemoteError as e:
            state = ('the old dataset is still there' if old else 'no dataset is there') if not self._swapped else \
                'the new train split is in place'
            raise RemoteError(f'{e}; {state}: run prep-data again') from None

    def _publish(self, folder: str, splits: Sequence[str], old: Sequence[str]) -> None:
        if old:
            _tag_shards(folder, splits, uuid.uuid4().hex[:8])
            write_marker(Path(folder), self.command)
        shards = [f'{s}/{n}' for s in splits for n in sorted(os.listdir(os.path.join(folder, s))) if n != INDEX]
        new = set(shards) | {f'{s}/{INDEX}' for s in splits}
        # First a marker that lists the old objects and the new ones: whatever a failure leaves is recognised as
        # prep-data's own by the next run, which may then replace it.
        self._put_bytes(marker_text(self.command, sorted(set(old) - {MARKER} | new)).encode(), MARKER)
        if f'val/{INDEX}' in old:
            self._delete([self.key(f'val/{INDEX}')])
        for name in shards:
            self._put(os.path.join(folder, name), name)
        for split in ('train', 'val'):
            if split in splits:
                self._put(os.path.join(folder, split, INDEX), f'{split}/{INDEX}')
                self._swapped = True
        self._delete([self.key(n) for n in old if n not in new and n != MARKER])
        self._put(os.path.join(folder, MARKER), MARKER)


def _tag_shards(folder: str, splits: Sequence[str], tag: str) -> None:
    """Renames every shard of the staged dataset to ``<tag>.<name>`` and rewrites the indexes to match."""
    for split in splits:
        index_path = os.path.join(folder, split, INDEX)
        with open(index_path) as f:
            index = json.load(f)
        for shard in index['shards']:
            for part in ('raw_data', 'zip_data'):
                info = shard.get(part)
                if info:
                    new = f'{tag}.{info["basename"]}'
                    old = os.path.join(folder, split, info['basename'])
                    if os.path.exists(old):  # a compressed shard's raw file exists only in a reader's cache
                        os.rename(old, os.path.join(folder, split, new))
                    info['basename'] = new
        with open(index_path, 'w') as f:
            json.dump(index, f, sort_keys=True)

