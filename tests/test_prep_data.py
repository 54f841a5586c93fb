"""``foundry-dbrx prep-data``: exact token streams from each input kind, the LLM Foundry loader reading the shards,
and bad input reported with file and line, leaving nothing that looks like a dataset."""

import json
import os
import re

import numpy as np
import pytest

from foundry_dbrx import cli
from foundry_dbrx.data.cl100k import ENDOFTEXT_ID, load_cl100k_encoding
from foundry_dbrx.data.prep import PrepConfig, PrepError, default_corpus_files, prep_data

EOT = ENDOFTEXT_ID


@pytest.fixture(scope='module')
def enc():
    return load_cl100k_encoding()


def read_split(folder, split):
    """Every sample of a split, in order, as one int array per sample."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=os.path.join(folder, split), shuffle=False, batch_size=1)
    return [ds[i]['tokens'] for i in range(len(ds))]


def expected_stream(enc, texts):
    return [t for text in texts for t in enc.encode_ordinary(text) + [EOT]]


def prep(tmp_path, inputs, **kw):
    kw.setdefault('out', str(tmp_path / 'out'))
    kw.setdefault('progress', False)
    return prep_data(PrepConfig(inputs=tuple(str(i) for i in inputs), **kw))


def leftovers(folder):
    """Anything prep-data may have left behind in ``folder`` (partial datasets are hidden .NAME.partial-*)."""
    return sorted(n for n in os.listdir(folder) if 'partial' in n or n == 'out')


def test_text_folder_exact_stream(tmp_path, enc):
    docs = tmp_path / 'docs'
    (docs / 'sub').mkdir(parents=True)
    texts = {'a.txt': 'First document.\nWith two lines, and <|endoftext|> as plain text.\n',
             'b.md': '# Second\n\nnaïve café 日本語 ' * 20,
             'sub/c.txt': 'third ' * 50}
    for name, text in texts.items():
        (docs / name).write_text(text, encoding='utf-8')
    (docs / 'empty.txt').write_text('')
    (docs / '.hidden.txt').write_text('never read')
    s = prep(tmp_path, [docs], max_seq_len=16, val_fraction=0.0)

    want = expected_stream(enc, [texts['a.txt'], texts['b.md'], texts['sub/c.txt']])  # sorted walk order
    got = np.concatenate(read_split(tmp_path / 'out', 'train'))
    assert s.documents == 3 and s.empty_documents == 1
    assert s.tokens == len(want)
    assert s.dropped_tail_tokens == len(want) % 16
    assert s.samples == {'train': len(want) // 16, 'val': 0}
    assert got.dtype == np.int32 and got.tolist() == want[:len(got)]
    # Only our separators carry 100257, though a document spells it out.
    assert want.count(EOT) == 3 and int((got == EOT).sum()) == want[:len(got)].count(EOT) >= 2
    assert not (tmp_path / 'out' / 'val').exists()
    assert leftovers(tmp_path) == ['out']


def test_jsonl_and_val_split(tmp_path, enc):
    lines = [json.dumps({'text': f'record {i}: ' + 'word ' * (i % 7 + 3), 'id': i}) for i in range(60)]
    lines.insert(5, '')  # blank lines are not documents
    lines.append(json.dumps({'text': ''}))
    path = tmp_path / 'data.jsonl'
    path.write_text('\n'.join(lines) + '\n')
    s = prep(tmp_path, [path], max_seq_len=8, val_fraction=0.1, shard_size='1kb')

    texts = [json.loads(line)['text'] for line in lines if line and json.loads(line)['text']]
    want = expected_stream(enc, texts)
    train, val = read_split(tmp_path / 'out', 'train'), read_split(tmp_path / 'out', 'val')
    # Replay the split rule: sample i goes to val when fewer than val_fraction * i went there before.
    merged, it_train, it_val, n_val = [], iter(train), iter(val), 0
    for i in range(len(train) + len(val)):
        to_val = n_val < 0.1 * i
        merged.append(next(it_val) if to_val else next(it_train))
        n_val += to_val
    assert np.concatenate(merged).tolist() == want[:8 * len(merged)]
    assert s.documents == 60 and s.empty_documents == 1
    assert s.samples == {'train': len(train), 'val': len(val)} and 0 < len(val) <= 0.1 * len(merged) + 1
    assert s.shards['train'] > 1  # 1kb shards: several files, one index
    with open(tmp_path / 'out' / 'train' / 'index.json') as f:
        index = json.load(f)
    assert len(index['shards']) == s.shards['train']
    assert index['shards'][0]['column_encodings'] == ['ndarray:int32']
    assert set(index['shards'][0]['raw_data']['hashes']) == {'sha1', 'xxh3_64'}


def test_hf_dataset_on_disk(tmp_path, enc):
    import datasets

    texts = [f'row {i} ' + 'lorem ipsum ' * (i + 1) for i in range(30)]
    datasets.DatasetDict({'train': datasets.Dataset.from_dict({'body': texts, 'n': list(range(30))})}).save_to_disk(
        str(tmp_path / 'ds'))
    s = prep(tmp_path, [tmp_path / 'ds'], text_field='body', max_seq_len=32, val_fraction=0.0)
    want = expected_stream(enc, texts)
    assert s.documents == 30 and s.tokens == len(want)
    assert np.concatenate(read_split(tmp_path / 'out', 'train')).tolist() == want[:len(want) // 32 * 32]

    with pytest.raises(PrepError, match=r"ds: --split \('test'\) is not one of the dataset's splits \['train'\]"):
        prep(tmp_path, [tmp_path / 'ds'], text_field='body', split='test', out=str(tmp_path / 'o2'))
    with pytest.raises(PrepError, match=r"ds\[train\]: no column 'text' \(columns: \['body', 'n'\]\)"):
        prep(tmp_path, [tmp_path / 'ds'], out=str(tmp_path / 'o3'))


def test_default_corpus_and_llmfoundry_loader(tmp_path, enc):
    from llmfoundry.data.text_data import StreamingTextDataset

    from foundry_dbrx.data.tokenizer import DbrxTokenizer

    files = default_corpus_files()
    assert len(files) > 100 and files == default_corpus_files()
    assert not any(part in f.split(os.sep) for f in files for part in ('site-packages', 'test', '__pycache__'))
    s = prep(tmp_path, [], default=True, max_files=12, max_seq_len=64)
    texts = [open(f, encoding='utf-8').read() for f in files[:12]]
    want = expected_stream(enc, [t for t in texts if t])
    assert s.tokens == len(want) and s.samples['val'] >= 1

    ds = StreamingTextDataset(tokenizer=DbrxTokenizer(), max_seq_len=64, local=str(tmp_path / 'out'),
                              split='train', shuffle=False, batch_size=1)
    first = ds[0]
    assert first.dtype.is_floating_point is False and first.tolist() == want[:64]  # sample 0 always trains

    capped = prep(tmp_path, [], default=True, max_tokens=5000, max_seq_len=64, out=str(tmp_path / 'capped'))
    assert 5000 <= capped.tokens < 5000 + max(len(enc.encode_ordinary(t)) for t in texts) + 1


def test_cli_summary_and_overwrite(tmp_path, capsys):
    docs = tmp_path / 'docs'
    docs.mkdir()
    (docs / 'a.txt').write_text('some words ' * 400)
    out = tmp_path / 'out'
    args = ['prep-data', str(docs), '--out', str(out), '--max-seq-len', '32', '--no-progress']
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    for word in ('documents: 1', 'dropped tail', 'samples: train', 'shards: train 1, val 1', 'bytes', 'tokens/s'):
        assert word in printed
    assert (out / 'train' / 'index.json').is_file() and (out / 'val' / 'index.json').is_file()

    assert cli.main(args) == 1
    assert 'holds an earlier output of foundry-dbrx prep-data; pass --overwrite to replace it' in capsys.readouterr().err
    (docs / 'b.txt').write_text('more words ' * 400)
    assert cli.main(args + ['--overwrite']) == 0
    assert 'documents: 2' in capsys.readouterr().out
    assert leftovers(tmp_path) == ['out']


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# case: (files to create, inputs, error message pattern). A good file comes first where it can, so that shards
# are being written when the bad one is met.
BIG = b'word ' * 3000
BAD_INPUTS = {
    'non-utf8': ({'docs/a.txt': BIG, 'docs/b.txt': b'line one\nline \xff two\n'}, ['docs'],
                 r'docs/b\.txt:2:6: not valid UTF-8 \(byte 0xff\)'),
    'jsonl-missing-field': ({'d.jsonl': b'{"text": "a"}\n\n{"body": "b"}\n'}, ['d.jsonl'],
                            r"d\.jsonl:3: no field 'text' \(fields: \['body'\]\); choose one with --text-field"),
    'jsonl-invalid': ({'a.txt': BIG, 'd.jsonl': b'{"text": "a"}\n{"text": "b",\n'}, ['a.txt', 'd.jsonl'],
                      r'd\.jsonl:2: invalid JSON'),
    'jsonl-not-string': ({'d.jsonl': b'{"text": 3}\n'}, ['d.jsonl'], r"d\.jsonl:1: field 'text' must be a string, got int"),
    'jsonl-non-utf8': ({'d.jsonl': b'{"text": "a"}\n{"text": "\xc3("}\n'}, ['d.jsonl'], r'd\.jsonl:2:11: not valid UTF-8'),
    'empty': ({'docs/a.txt': b'', 'docs/b.txt': b''}, ['docs'],
              r'empty input: .*docs gave no documents with text \(2 empty'),
    'too-short': ({'docs/a.txt': b'tiny'}, ['docs'], r'make 0 samples of --max-seq-len 64'),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_names_file_and_line_and_leaves_nothing(tmp_path, capsys, case):
    files, inputs, message = BAD_INPUTS[case]
    for name, data in files.items():
        _write(tmp_path / 'in' / name, data)
    args = ['prep-data', *(str(tmp_path / 'in' / i) for i in inputs), '--out', str(tmp_path / 'out'),
            '--max-seq-len', '64', '--shard-size', '4kb', '--no-progress']
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith('foundry-dbrx prep-data: error: ')
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert re.search(message, err), err
    assert leftovers(tmp_path) == []  # no OUT, no hidden partial folder


def test_unreadable_file(tmp_path):
    docs = tmp_path / 'docs'
    docs.mkdir()
    (docs / 'a.txt').write_text('word ' * 3000)
    os.symlink(tmp_path / 'gone.txt', docs / 'b.txt')  # a dangling link: listed, not readable
    with pytest.raises(PrepError, match=r'docs/b\.txt: cannot read: No such file or directory'):
        prep(tmp_path, [docs], max_seq_len=64)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize('kw, message', [
    (dict(inputs=(), default=False), r'give input paths or --default, not neither'),
    (dict(inputs=('x',), default=True), r'not both'),
    (dict(inputs=('x',), max_seq_len=0), r'--max-seq-len \(0\) must be a positive integer'),
    (dict(inputs=('x',), val_fraction=0.7), r'--val-fraction \(0\.7\) must be in \[0, 0\.5\]'),
    (dict(inputs=('x',), format='csv'), r"--format \('csv'\) must be one of"),
    (dict(inputs=('x',), compression='rar'), r"--compression \('rar'\) is not a compression Streaming knows"),
    (dict(inputs=('x',), max_tokens=-5), r'--max-tokens \(-5\) must be a positive integer when given'),
    (dict(inputs=('x',), shard_size='lots'), r"--shard-size \('lots'\) must be a size below 4 GiB"),
    (dict(inputs=('x',), shard_size='5gb'), r"--shard-size \('5gb'\) must be a size below 4 GiB"),
])
def test_bad_options(kw, message):
    with pytest.raises(PrepError, match=message):
        PrepConfig(out='o', **kw)


def test_missing_input_path(tmp_path):
    with pytest.raises(PrepError, match=r'input .*nowhere: no such file or folder'):
        prep(tmp_path, [tmp_path / 'nowhere'])
    assert leftovers(tmp_path) == []


def test_parallel_workers_write_the_same_bytes(tmp_path, monkeypatch):
    from foundry_dbrx.data import prep as prep_module

    monkeypatch.setattr(prep_module, '_BATCH_CHARS', 20_000)  # many batches in flight, so order matters
    outs = {}
    for workers in (1, 2):
        s = prep(tmp_path, [], default=True, max_files=30, max_seq_len=64, workers=workers,
                 out=str(tmp_path / f'w{workers}'))
        assert s.documents == 30
        outs[workers] = {split: (tmp_path / f'w{workers}' / split / 'index.json').read_text() for split in ('train', 'val')}
    assert outs[1] == outs[2]  # the indexes hold every shard's sha1
