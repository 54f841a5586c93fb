"""Writing outputs without destroying what the tool did not write: used by ``prep-data`` and the converters.

Every output (a folder, or one file) is built under a hidden temporary sibling and installed with a rename that
never replaces an existing path, while a lock on ``OUT`` keeps a second process from writing it at the same time:

1. :func:`atomic_output` refuses an ``OUT`` that is, or holds, one of the command's inputs;
2. takes the lock (``.OUT.lock``, an ``flock``: released by the kernel if the process dies);
3. cleans the hidden temporaries that dead processes left beside ``OUT`` (and reports those of other hosts);
4. looks at what is at ``OUT``: nothing, an earlier output of the same command (recognised by the marker file
   :data:`MARKER` that the command wrote into it, listing every file it wrote; a single-file output is recognised
   by a caller-supplied check), or something else. Without ``overwrite`` anything there is an error that says what
   it is; with it, only an earlier output of the same command, holding nothing the command did not write, is
   replaced;
5. checks the free space when the size is known, and turns a disk-full error into one line naming the path and
   the bytes needed;
6. installs: the old output is renamed aside, the new one renamed into place with ``RENAME_NOREPLACE``, the old
   one removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

__all__ = ['MARKER', 'OutputError', 'atomic_output', 'output_lock', 'rename_no_replace', 'check_not_input',
           'clean_stale_temporaries', 'check_free_space', 'disk_full_error', 'disk_full_as_error', 'write_marker',
           'marker_text',
           'read_marker', 'foreign_files', 'is_disk_full', 'remove_path', 'pid_alive', 'temporary_sibling']

log = logging.getLogger(__name__)

MARKER = '.foundry-dbrx-output.json'
_HOST = socket.gethostname().replace('-', '_') or 'host'
# .NAME.partial-HOST-PID-RANDOM (a build in progress) and .NAME.old-HOST-PID-RANDOM (an output being replaced)
_TEMP = re.compile(r'^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]{8}$')

NeededBytes = Union[None, int, Callable[[], Optional[int]]]


class OutputError(ValueError):
    """An output cannot be written as asked; the message names the path and says what is there or what is missing."""


def temporary_sibling(out: Path, kind: str = 'partial') -> Path:
    """A hidden name beside ``out`` for a build in progress (``partial``) or an output being replaced (``old``),
    which :func:`clean_stale_temporaries` recognises once its process is gone."""
    return out.parent / f'.{out.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}'


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def remove_path(path: Path) -> None:
    """Removes a file, a symlink (not its target) or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _exists(path):
        path.unlink()


# --------------------------------------------------------------------------------------------------------- rename
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith('linux') else None
_renameat2 = getattr(_libc, 'renameat2', None) if _libc is not None else None


def rename_no_replace(src: Path, dst: Path) -> None:
    """Renames ``src`` to ``dst``, atomically, failing with ``FileExistsError`` if ``dst`` exists, even when another
    process creates it at the same moment (Linux ``renameat2(RENAME_NOREPLACE)``). Where that call is missing, a
    file is hard-linked (which also refuses an existing name) and a folder renamed after a check, which the lock of
    :func:`output_lock` makes safe between processes of this package."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: a filesystem without RENAME_NOREPLACE
            raise OSError(err, os.strerror(err), str(dst)) if err != errno.EEXIST else FileExistsError(
                err, os.strerror(err), str(dst))
    if src.is_dir():
        if _exists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
    else:
        os.link(src, dst)
        os.unlink(src)


# ----------------------------------------------------------------------------------------------------------- lock
@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Holds ``.OUT.lock`` beside ``out`` for the block; a second holder fails at once with an error naming ``out``
    and the process that holds it. An ``flock``: a process that dies releases it."""
    lock = out.parent / f'.{out.name}.lock'
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'unknown'
            os.close(fd)
            raise OutputError(f'{out} is being written by another process ({holder}); wait for it to finish or '
                              'choose another output') from None
        # The holder before us may have removed the file after we opened it: then this lock guards nothing.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}'.encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


# ------------------------------------------------------------------------------------------------ stale temporaries
def pid_alive(pid: object) -> bool:
    """Whether process ``pid`` of this host exists (a malformed pid counts as gone)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(out: Path) -> list[str]:
    """Removes the hidden temporaries beside ``out`` that processes of this host left when they died (a half-built
    ``.partial``; an ``.old`` copy whose replacement was installed, or which is put back when ``out`` is missing),
    and reports those of other hosts. Returns one line per temporary found. Call it holding :func:`output_lock`."""
    notes = []
    if not out.parent.is_dir():
        return notes
    for entry in sorted(out.parent.iterdir()):
        m = _TEMP.match(entry.name)
        if not m or m['name'] != out.name:
            continue
        if m['host'] != _HOST:
            notes.append(f'{entry}: left by process {m["pid"]} on host {m["host"]}; remove it if that process is '
                         'gone')
        elif not pid_alive(m['pid']):
            if m['kind'] == 'old' and not _exists(out):
                rename_no_replace(entry, out)
                notes.append(f'{out}: put back from {entry.name}, which process {m["pid"]} moved aside and died')
            else:
                remove_path(entry)
                notes.append(f'{entry}: removed, left by process {m["pid"]}, which died')
    for note in notes:
        log.warning('%s', note)
    return notes


# --------------------------------------------------------------------------------------------------------- marker
def marker_text(command: str, files: Sequence[str]) -> str:
    """The content of a :data:`MARKER`: which command wrote the output, and every file it wrote (relative paths)."""
    return json.dumps({'written_by': f'foundry-dbrx {command}', 'files': sorted(files)}, indent=1) + '\n'


def write_marker(folder: Path, command: str) -> None:
    """Writes :data:`MARKER` into ``folder``, listing every file below ``folder``."""
    files = [str(p.relative_to(folder)) for p in folder.rglob('*') if not p.is_dir() and p.name != MARKER]
    (folder / MARKER).write_text(marker_text(command, files))


def read_marker(folder: Path) -> Optional[dict]:
    """The marker of ``folder``, or None if it has none (or an unreadable one)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def foreign_files(folder: Path, command: str) -> Optional[list[str]]:
    """None if ``folder`` has no marker of ``command``; else the entries below it that the command did not write
    (empty when the folder holds only its own output)."""
    marker = read_marker(folder)
    if marker is None or marker.get('written_by') != f'foundry-dbrx {command}':
        return None
    ours = set(marker.get('files') or ()) | {MARKER}
    found = []
    for p in sorted(folder.rglob('*')):
        rel = str(p.relative_to(folder))
        if p.is_symlink() or not p.is_dir():
            if rel not in ours:
                found.append(rel)
        elif not any(o.startswith(rel + os.sep) for o in ours):
            found.append(rel + os.sep)
    return found


def _listed(names: Sequence[str], limit: int = 5) -> str:
    more = f' and {len(names) - limit} more' if len(names) > limit else ''
    return ', '.join(names[:limit]) + more


def _describe(out: Path, command: str, is_dir: bool,
              earlier_output: Optional[Callable[[Path], bool]]) -> tuple[bool, str]:
    """(whether ``out`` is an earlier output of ``command`` that may be replaced, what is there in words)."""
    if out.is_symlink():
        return False, f'is a symlink (to {os.readlink(out)})'
    if is_dir:
        if not out.is_dir():
            return False, 'is a file, not a folder'
        foreign = foreign_files(out, command)
        entries = sorted(p.name + (os.sep if p.is_dir() else '') for p in out.iterdir())
        if foreign is None:
            return False, (f'holds {len(entries)} entries that foundry-dbrx {command} did not write '
                           f'({_listed(entries)})')
        if foreign:
            return False, (f'holds an earlier output of foundry-dbrx {command}, plus {len(foreign)} entries it did '
                           f'not write ({_listed(foreign)})')
        return True, f'holds an earlier output of foundry-dbrx {command}'
    if out.is_dir():
        return False, 'is a folder, not a file'
    if earlier_output is not None and earlier_output(out):
        return True, f'holds an earlier output of foundry-dbrx {command}'
    return False, f'is a file that foundry-dbrx {command} did not write'


def check_not_input(out: Path, inputs: Sequence[Path], option: str = 'OUT', inside_too: bool = False) -> None:
    """Refuses an output path that is one of ``inputs`` or a folder holding one (with ``inside_too``, also one
    inside an input folder, where the next run would read its own output)."""
    out_r = out.resolve()
    for given in inputs:
        inp = Path(given).resolve()
        if out_r == inp:
            raise OutputError(f'{option} {out} is the input {given}; write the output somewhere else')
        if inp.is_relative_to(out_r):
            raise OutputError(f'{option} {out} holds the input {given}; replacing {out} would delete it: write the '
                              'output somewhere else')
        if inside_too and inp.is_dir() and out_r.is_relative_to(inp):
            raise OutputError(f'{option} {out} is inside the input folder {given}, so it would be read as input '
                              'by the next run; write the output somewhere else')


# ------------------------------------------------------------------------------------------------------ disk space
def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _needed(needed: NeededBytes) -> Optional[int]:
    return needed() if callable(needed) else needed


def _free(path: Path) -> Optional[int]:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def check_free_space(path: Path, needed: Optional[int]) -> None:
    """Fails before any work when the filesystem that ``path`` is to be written to has less free space than
    ``needed`` bytes (None: unknown, not checked)."""
    free = _free(path)
    if needed is not None and free is not None and free < needed:
        raise OutputError(f'{path}: not enough space on its filesystem: it needs {needed:,} bytes, {free:,} are free')


def disk_full_error(path: Path, error: OSError, needed: NeededBytes = None) -> OutputError:
    """The one-line error for a disk-full ``error`` while writing ``path``: the bytes needed (``needed``: a count,
    or a function giving one at the time of the error) and the bytes free. Build it after removing the partial
    output, so that the free space is what the user has to work with."""
    n, free = _needed(needed), _free(path)
    need = f'it needs about {n:,} bytes' if n else 'it needs more space'
    have = f', {free:,} are free' if free is not None else ''
    return OutputError(f'{path}: no space left on device ({error.strerror}): {need}{have}; the partial output was '
                       'removed')


@contextlib.contextmanager
def disk_full_as_error(path: Path, needed: NeededBytes = None, cleanup: Callable[[], None] = lambda: None
                       ) -> Iterator[None]:
    """Turns a disk-full ``OSError`` inside the block into :func:`disk_full_error`, after running ``cleanup``."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        n = _needed(needed)
        cleanup()
        raise disk_full_error(path, e, n) from None


# ---------------------------------------------------------------------------------------------------- the output
@contextlib.contextmanager
def atomic_output(out: Union[str, os.PathLike], *, command: str, overwrite: bool, is_dir: bool,
                  inputs: Sequence[Union[str, os.PathLike]] = (), needed_bytes: NeededBytes = None,
                  earlier_output: Optional[Callable[[Path], bool]] = None, option: str = 'OUT',
                  inputs_contain_out: bool = False) -> Iterator[Path]:
    """Yields a hidden temporary path beside ``out`` (a new empty folder when ``is_dir``) to build the output in;
    when the block completes, a folder gets the :data:`MARKER` of ``command`` and the output is installed at
    ``out``. On any error the temporary is removed and ``out`` is left as it was. The steps and the rules for an
    existing ``out`` are in the module docstring; ``earlier_output(path)`` says whether a file at ``out`` is an
    earlier output of ``command`` (single-file outputs)."""
    out = Path(os.path.abspath(out))
    check_not_input(out, [Path(i) for i in inputs], option, inside_too=inputs_contain_out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f'{option} {out}: cannot create its folder: {e.strerror or e}') from None
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f'{option} {out}: {out.parent} is not writable')
    with output_lock(out):
        clean_stale_temporaries(out)
        if is_dir and out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()  # an empty folder holds nothing to lose: as if OUT did not exist
        replace = _exists(out)
        if replace:
            ours, what = _describe(out, command, is_dir, earlier_output)
            if not overwrite:
                hint = 'pass --overwrite to replace it' if ours else 'choose another output'
                raise OutputError(f'{option} {out} {what}; {hint}')
            if not ours:
                raise OutputError(f'{option} {out} {what}; --overwrite replaces only an earlier output of '
                                  f'foundry-dbrx {command} (recognised by its {MARKER}): choose another output or '
                                  'remove it yourself')
        check_free_space(out, _needed(needed_bytes))
        tmp = temporary_sibling(out, 'partial')
        if is_dir:
            tmp.mkdir()
        try:
            yield tmp
            if is_dir:
                write_marker(tmp, command)
            _install(tmp, out, replace)
        except BaseException as e:
            full = is_disk_full(e)
            needed = _needed(needed_bytes) if full else None  # before the partial output, which it may measure, goes
            remove_path(tmp)
            if full:
                raise disk_full_error(out, e, needed) from None
            raise


def _install(tmp: Path, out: Path, replace: bool) -> None:
    old = None
    if replace:
        old = temporary_sibling(out, 'old')
        rename_no_replace(out, old)
    try:
        rename_no_replace(tmp, out)
    except BaseException:
        if old is not None:
            rename_no_replace(old, out)  # put the earlier output back
        raise
    if old is not None:
        remove_path(old)
