"""The ``dbrx`` tokenizer: DBRX's ids, exact round trips, ChatML, pickling, and loading with no network at all."""

import os
import pickle
import subprocess
import sys
import textwrap

import pytest

from foundry_dbrx.data import cl100k
from foundry_dbrx.data.cl100k import CL100K_CACHE_NAME, CL100K_SHA256, TokenizerFileError, ensure_cl100k_cache

TEXTS = [
    'def f(x):\n    return x ** 2  # square\n',
    'naïve café, 日本語のテキスト, emoji 🎉🚀, tabs\tand\r\nwindows line ends',
    '  leading spaces and trailing   ',
    '<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi<|im_end|><|endoftext|><|pad|>',
]


@pytest.fixture(scope='module')
def tokenizer():
    from foundry_dbrx.data.tokenizer import DbrxTokenizer

    return DbrxTokenizer(model_max_length=4096)


def test_special_token_ids(tokenizer):
    from foundry_dbrx.data.tokenizer import DBRX_VOCAB_SIZE

    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (100257, 100257, 100257)
    assert tokenizer.pad_token_id == 100277
    assert tokenizer.convert_tokens_to_ids(['<|im_start|>', '<|im_end|>']) == [100278, 100279]
    assert len(tokenizer) == 100280 <= DBRX_VOCAB_SIZE == 100352
    # Special tokens written in the text become single ids.
    ids = tokenizer('<|im_start|>x<|im_end|><|endoftext|>')['input_ids']
    assert ids[0] == 100278 and ids[-2:] == [100279, 100257]


@pytest.mark.parametrize('text', TEXTS)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer(text)['input_ids']
    assert tokenizer.decode(ids) == text


def test_ordinary_text_matches_tiktoken(tokenizer):
    enc = cl100k.load_cl100k_encoding()
    for text in TEXTS[:3]:
        assert tokenizer(text)['input_ids'] == enc.encode_ordinary(text)
    assert tokenizer('hello world')['input_ids'] == [15339, 1917]  # cl100k's well-known ids


def test_chatml_template(tokenizer):
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
                    '<|im_start|>assistant\n')
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids.count(100278) == 3 and ids.count(100279) == 2


def test_pickles(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert type(clone) is type(tokenizer)
    assert clone(TEXTS[3])['input_ids'] == tokenizer(TEXTS[3])['input_ids']


def test_fixed_options_are_rejected(tokenizer):
    from foundry_dbrx.data.tokenizer import DbrxTokenizer

    with pytest.raises(ValueError, match=r"encoding_name \('o200k_base'\) is fixed to 'cl100k_base'"):
        DbrxTokenizer(encoding_name='o200k_base')


# ---- where the cl100k_base file comes from


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No tiktoken cache anywhere: $TIKTOKEN_CACHE_DIR unset, our own cache an empty folder."""
    # setenv first so monkeypatch records the old value (or its absence) and restores it: the code under test
    # sets TIKTOKEN_CACHE_DIR for the process, which must not leak into later tests.
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path / 'unused'))
    monkeypatch.delenv('TIKTOKEN_CACHE_DIR')
    monkeypatch.setenv('FOUNDRY_DBRX_CACHE', str(tmp_path / 'ours'))
    return tmp_path


def _sha256(path):
    return cl100k._sha256_of(str(path))


def test_cache_filled_from_bpe_openai(empty_caches):
    folder = ensure_cl100k_cache()
    assert folder == str(empty_caches / 'ours' / 'tiktoken')
    assert os.environ['TIKTOKEN_CACHE_DIR'] == folder
    assert _sha256(os.path.join(folder, CL100K_CACHE_NAME)) == CL100K_SHA256
    assert [n for n in os.listdir(folder) if n.endswith('.tmp')] == []  # the atomic write left no temp file


def test_user_cache_used_without_bpe_openai(empty_caches, monkeypatch):
    user = empty_caches / 'user'
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(user))
    ensure_cl100k_cache()  # fills $TIKTOKEN_CACHE_DIR, since it is set and writable
    assert _sha256(user / CL100K_CACHE_NAME) == CL100K_SHA256
    # The GPU machines: the file is there, bpe-openai is not.
    monkeypatch.setattr(cl100k, '_bundled_gz_path', lambda: None)
    assert ensure_cl100k_cache() == str(user)
    assert not (empty_caches / 'ours').exists()


def test_corrupt_cached_file_is_replaced(empty_caches, monkeypatch):
    user = empty_caches / 'user'
    user.mkdir()
    (user / CL100K_CACHE_NAME).write_bytes(b'not the file')
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(user))
    assert ensure_cl100k_cache() == str(user)
    assert _sha256(user / CL100K_CACHE_NAME) == CL100K_SHA256


def test_clear_error_when_no_copy_exists(empty_caches, monkeypatch):
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(empty_caches / 'user'))
    monkeypatch.setattr(cl100k, '_bundled_gz_path', lambda: None)
    with pytest.raises(TokenizerFileError, match=r'bpe-openai.*not installed.*\$TIKTOKEN_CACHE_DIR/9b5ad71b'):
        ensure_cl100k_cache()


def test_offline_fresh_machine_through_llmfoundry_registry(tmp_path, tokenizer):
    """A fresh process, empty caches, every socket refused: LLM Foundry builds ``dbrx`` from its entry point, and
    a pickled tokenizer (what a dataloader worker receives) loads and encodes."""
    pickled = tmp_path / 'tok.pkl'
    pickled.write_bytes(pickle.dumps(tokenizer))
    script = textwrap.dedent(f'''
        import os, pickle, sys

        def no_network(event, args):
            if event in ('socket.connect', 'socket.getaddrinfo', 'socket.gethostbyname'):
                raise RuntimeError(f'network access attempted: {{event}} {{args}}')
        sys.addaudithook(no_network)

        from llmfoundry.utils.builders import build_tokenizer
        tok = build_tokenizer('dbrx', {{'model_max_length': 64}})
        print(type(tok).__name__, tok.eos_token_id, tok.pad_token_id, tok.model_max_length)
        print(tok('hello <|im_end|>')['input_ids'])
        print(os.environ['TIKTOKEN_CACHE_DIR'])
        print(pickle.load(open({str(pickled)!r}, 'rb'))('hello world')['input_ids'])
    ''')
    env = {k: v for k, v in os.environ.items() if k not in ('TIKTOKEN_CACHE_DIR', 'DATA_GYM_CACHE_DIR')}
    env.update(HOME=str(tmp_path / 'home'), FOUNDRY_DBRX_CACHE=str(tmp_path / 'cache'), HF_HUB_OFFLINE='1',
               PYTHONWARNINGS='ignore')
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()[-4:]
    assert lines[0] == 'DbrxTokenizer 100257 100277 64'
    assert lines[1] == '[15339, 220, 100279]'
    assert lines[2] == str(tmp_path / 'cache' / 'tiktoken')
    assert lines[3] == '[15339, 1917]'
