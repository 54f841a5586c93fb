"""tiktoken's ``cl100k_base`` without the network.

tiktoken fetches ``cl100k_base`` from the network unless ``$TIKTOKEN_CACHE_DIR/<sha1 of the download address>``
already holds it. :func:`ensure_cl100k_cache` makes sure such a cache exists before tiktoken is asked:

1. ``$TIKTOKEN_CACHE_DIR`` (or our own cache) already holds a file with the right sha256: use it (the GPU
   machines ship it this way, without ``bpe-openai``).
2. Otherwise fill a cache from the copy inside the ``bpe-openai`` package (``bpe_openai/data/cl100k_base.tiktoken.gz``,
   the same bytes, sha256 checked): ``$TIKTOKEN_CACHE_DIR`` when it is set and writable, else
   ``$FOUNDRY_DBRX_CACHE/tiktoken`` (default ``~/.cache/foundry-dbrx/tiktoken``), written atomically.
3. Neither: :class:`TokenizerFileError` saying what to install or where to put the file.

Either way ``TIKTOKEN_CACHE_DIR`` ends up pointing at the folder, so dataloader workers and launched ranks inherit it.
This module imports neither LLM Foundry nor transformers: ``prep-data`` uses it directly.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import os
import tempfile
from typing import Optional

__all__ = ['TokenizerFileError', 'ensure_cl100k_cache', 'load_cl100k_encoding', 'CL100K_CACHE_NAME', 'CL100K_SHA256',
           'ENDOFTEXT_ID']

log = logging.getLogger(__name__)

# What tiktoken's cl100k_base constructor downloads and checks (tiktoken_ext/openai_public.py).
CL100K_URL = 'https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken'
CL100K_SHA256 = '223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7'
# cl100k's <|endoftext|>, DBRX's bos = eos = unk and the separator between documents in prep-data.
ENDOFTEXT_ID = 100257
# tiktoken's cache file name: sha1 of the address (9b5ad71b2ce5302211f9c61530b329a4922fc6a4).
CL100K_CACHE_NAME = hashlib.sha1(CL100K_URL.encode()).hexdigest()


class TokenizerFileError(RuntimeError):
    """The cl100k_base file is neither in a tiktoken cache nor available from the ``bpe-openai`` package."""


def _sha256_of(path: str) -> Optional[str]:
    try:
        with open(path, 'rb') as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _bundled_gz_path() -> Optional[str]:
    # find_spec locates the package without importing it (its __init__ loads a Rust extension we do not need).
    spec = importlib.util.find_spec('bpe_openai')
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, 'data', 'cl100k_base.tiktoken.gz')
        if os.path.isfile(path):
            return path
    return None


def default_cache_dir() -> str:
    """``$FOUNDRY_DBRX_CACHE/tiktoken``, default ``${XDG_CACHE_HOME:-~/.cache}/foundry-dbrx/tiktoken``."""
    root = os.environ.get('FOUNDRY_DBRX_CACHE') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'foundry-dbrx')
    return os.path.join(root, 'tiktoken')


def _write_atomically(folder: str, name: str, data: bytes) -> None:
    os.makedirs(folder, exist_ok=True)
    # A reader (another rank, a dataloader worker) sees either no file or the whole file, never a prefix.
    fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a shared cache must be readable by others
        os.replace(tmp, os.path.join(folder, name))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def ensure_cl100k_cache() -> str:
    """Makes sure a tiktoken cache holds cl100k_base, points ``TIKTOKEN_CACHE_DIR`` at it, returns the folder.

    Never touches the network. Raises :class:`TokenizerFileError` when no copy of the file is available.
    """
    user_dir = os.environ.get('TIKTOKEN_CACHE_DIR')
    candidates = [d for d in (user_dir, default_cache_dir()) if d]
    for folder in candidates:
        if _sha256_of(os.path.join(folder, CL100K_CACHE_NAME)) == CL100K_SHA256:
            os.environ['TIKTOKEN_CACHE_DIR'] = folder
            return folder

    gz_path = _bundled_gz_path()
    if gz_path is None:
        where = f'$TIKTOKEN_CACHE_DIR ({user_dir})' if user_dir else '$TIKTOKEN_CACHE_DIR (not set)'
        raise TokenizerFileError(
            f'the dbrx tokenizer needs tiktoken\'s cl100k_base file and will not download it: {where} has no '
            f'valid {CL100K_CACHE_NAME}, and the bpe-openai package that ships a copy is not installed. '
            f'Install it (pip install bpe-openai==0.1.4) or put the file (sha256 {CL100K_SHA256}) at '
            f'$TIKTOKEN_CACHE_DIR/{CL100K_CACHE_NAME}.')
    with gzip.open(gz_path, 'rb') as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
        raise TokenizerFileError(
            f'{gz_path} does not hold the cl100k_base file tiktoken expects (sha256 {CL100K_SHA256}); '
            'reinstall bpe-openai==0.1.4')

    errors = []
    for folder in candidates:
        try:
            _write_atomically(folder, CL100K_CACHE_NAME, data)
        except OSError as e:  # a read-only $TIKTOKEN_CACHE_DIR: fall back to our own cache
            errors.append(f'{folder}: {e}')
            continue
        if user_dir and folder != user_dir:
            log.warning('TIKTOKEN_CACHE_DIR=%s is not writable; using %s for cl100k_base', user_dir, folder)
        os.environ['TIKTOKEN_CACHE_DIR'] = folder
        log.info('cl100k_base copied from %s into the tiktoken cache %s', gz_path, folder)
        return folder
    raise TokenizerFileError(f'could not write cl100k_base into any tiktoken cache: {"; ".join(errors)}')


def load_cl100k_encoding():
    """tiktoken's ``cl100k_base`` Encoding, loaded offline (see :func:`ensure_cl100k_cache`)."""
    import tiktoken

    ensure_cl100k_cache()
    return tiktoken.get_encoding('cl100k_base')
