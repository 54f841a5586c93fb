"""The files of an HF DBRX folder: their names, and the small non-weight files (tokenizer, generation config,
model card) that travel inside a Composer checkpoint made by ``hf-to-composer`` and come back out of
``composer-to-hf``.

A carried file is written back under its stored name, so the name is a plain one from :data:`CARRIED_FILES` or the
checkpoint is refused: a name such as ``../x``, an absolute path or ``model.safetensors`` would otherwise write
outside the output folder or over the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

__all__ = ['HF_CONFIG', 'HF_SINGLE_FILE', 'HF_INDEX', 'HF_GENERATION_CONFIG', 'CARRIED_FILES', 'carry_files',
           'check_carried_files']

log = logging.getLogger(__name__)

HF_CONFIG = 'config.json'
HF_SINGLE_FILE = 'model.safetensors'
HF_INDEX = 'model.safetensors.index.json'
HF_GENERATION_CONFIG = 'generation_config.json'

# Plain names only, each a file transformers or a DBRX tokenizer reads next to the weights. The two .py files are
# tokenizer code that AutoTokenizer runs only with trust_remote_code: `tokenizer.py` is what LLM Foundry's tiktoken
# tokenizer (our `dbrx` tokenizer) saves, `tiktoken.py` what the released databricks/dbrx folders ship.
CARRIED_FILES = frozenset({
    HF_GENERATION_CONFIG, 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json',
    'chat_template.jinja', 'chat_template.json', 'vocab.json', 'merges.txt', 'vocab.txt', 'tokenizer.model',
    'tokenizer.py', 'tiktoken.py', 'README.md', 'LICENSE', 'LICENSE.txt', 'NOTICE',
})
_CARRY_MAX_BYTES = 64 * 2**20


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (a symlink, perhaps) ends up inside ``folder``, or in the ``blobs`` folder of the Hugging Face
    cache snapshot that ``folder`` is (``<repo>/snapshots/<rev>/x -> ../../blobs/<hash>``: every file there is a
    link, and the folder is still a plain HF folder)."""
    target = path.resolve()
    if target.is_relative_to(folder.resolve()):
        return True
    return folder.parent.name == 'snapshots' and target.parent == (folder.parent.parent / 'blobs').resolve()


def carry_files(folder: Path) -> dict[str, bytes]:
    """The files of ``folder`` named in :data:`CARRIED_FILES`, as bytes. A symlink that leads out of the folder is an
    error naming it (carrying it would copy, say, a key file into a checkpoint that gets shared)."""
    out = {}
    for name in sorted(CARRIED_FILES):
        p = folder / name
        if not (p.exists() or p.is_symlink()):
            continue
        if p.is_symlink() and not _inside(p, folder):
            raise ValueError(f'{p} is a symlink to {p.resolve()}, outside {folder}; copy the file into the folder '
                             'if it belongs to this model')
        if not p.is_file():
            raise ValueError(f'{p} is not a regular file')
        size = p.stat().st_size
        if size > _CARRY_MAX_BYTES:
            log.warning('not carrying %s (%d bytes > %d)', p, size, _CARRY_MAX_BYTES)
            continue
        out[name] = p.read_bytes()
    return out


def check_carried_files(files: Any, where: str) -> Mapping[str, bytes]:
    """``files`` (a checkpoint's carried ``{name: bytes}``) if every name is one of :data:`CARRIED_FILES`, else a
    ``ValueError`` naming the offending names."""
    if not isinstance(files, Mapping):
        raise ValueError(f'{where}: carried files must be a {{name: bytes}} mapping, got {type(files).__name__}')
    bad = sorted(repr(n) for n, data in files.items() if n not in CARRIED_FILES or not isinstance(data, bytes))
    if bad:
        raise ValueError(f'{where} carries file(s) {", ".join(bad)}: not among the tokenizer / config file names '
                         f'foundry-dbrx carries ({", ".join(sorted(CARRIED_FILES))}); refusing to write them')
    return files
