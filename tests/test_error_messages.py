"""The messages a newcomer met on their first day, each as the accident that produced it: a damaged .safetensors
file, a checkpoint cut short while being copied, a mistyped HF folder, a JSON line with an unterminated string;
and the file modes of an exported HF folder."""

from __future__ import annotations

import os
import stat

import pytest

from foundry_dbrx import hf
from foundry_dbrx.cli import main
from tests.test_hf_convert import build_hf_dir


@pytest.fixture
def hf_dir(tmp_path):
    path = tmp_path / 'hf'
    build_hf_dir(path)
    return path


def _convert(capsys, *argv) -> tuple[int, str]:
    rc = main(['convert', *argv, '--quiet'])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and 'Traceback' not in err, err
    return rc, lines[0]


def test_a_damaged_safetensors_shard_is_named(hf_dir, tmp_path, capsys):
    shard = sorted(hf_dir.glob('*.safetensors'))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy that stopped half-way
    rc, line = _convert(capsys, 'hf-to-composer', str(hf_dir), str(tmp_path / 'out.pt'))
    assert rc == 1
    assert line.startswith(f'foundry-dbrx convert: error: {shard}: not a readable safetensors file (SafetensorError')
    assert not (tmp_path / 'out.pt').exists()


def test_a_cut_short_checkpoint_is_called_that_not_compressed(hf_dir, tmp_path, capsys):
    pt = hf.hf_to_composer(hf_dir, tmp_path / 'model.pt')
    pt.write_bytes(pt.read_bytes()[:-1000])
    rc, line = _convert(capsys, 'composer-to-hf', str(pt), str(tmp_path / 'out'))
    assert rc == 1
    assert f'{pt}: a zip file with no directory at its end' in line and 'cut short' in line
    assert 'decompress' not in line

    gz = tmp_path / 'model.pt.gz'
    gz.write_bytes(b'\x1f\x8b\x08' + bytes(100))
    rc, line = _convert(capsys, 'composer-to-hf', str(gz), str(tmp_path / 'out'))
    assert rc == 1 and 'a compressed Composer checkpoint (.tar / .gz / .lz4 / .zst): decompress it first' in line


def test_a_missing_hf_folder_is_called_missing(tmp_path, capsys):
    rc, line = _convert(capsys, 'hf-to-composer', str(tmp_path / 'no-such-model'), str(tmp_path / 'out.pt'))
    assert rc == 1
    assert line == (f'foundry-dbrx convert: error: {tmp_path}/no-such-model: no such folder (expected an HF DBRX '
                    'folder: config.json and safetensors weights)')


@pytest.mark.parametrize('line, message', [
    ('{"text": "no end}', 'Unterminated string starting at column 10'),  # the last line, no newline
    ('{"text": "no end}\n', 'Invalid control character at column 18'),    # the string runs into the newline
])
def test_json_errors_read_naturally(tmp_path, capsys, line, message):
    bad = tmp_path / 'd.jsonl'
    bad.write_text('{"text": "fine"}\n' + line)
    rc = main(['prep-data', str(bad), '--out', str(tmp_path / 'out'), '--no-progress', '--workers', '1'])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip() == f'foundry-dbrx prep-data: error: {bad}:2: invalid JSON ({message})'


def test_exported_files_all_get_the_same_mode(hf_dir, tmp_path):
    pt = hf.hf_to_composer(hf_dir, tmp_path / 'model.pt')
    out = hf.composer_to_hf(pt, tmp_path / 'export', shard_size='100KB')
    expected = 0o666 & ~_umask()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert any(name.endswith('.safetensors') for name in modes)
    assert set(modes.values()) == {expected}, {n: oct(m) for n, m in modes.items()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
