"""HF DBRX <-> Composer conversion (foundry_dbrx.hf): round trip, key checks, atomic output, peak memory, CLI,
and starting a model from an HF folder (pretrained_hf_dir)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from foundry_dbrx import hf
from foundry_dbrx.composer_model import ComposerDbrxCausalLM
from foundry_dbrx.config import DbrxConfig
from foundry_dbrx.outputs import OutputError

from conftest import VENV_BIN, subprocess_env

CFG = dict(d_model=48, n_heads=6, n_layers=2, vocab_size=1000, max_seq_len=64,
           attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=500000.0),
           ffn_config=dict(ffn_hidden_size=40, moe_num_experts=8, moe_top_k=2, moe_loss_weight=0.05))


def build_hf_dir(path, cfg=CFG, dtype=torch.bfloat16, shard='60KB', seed=0):
    """A random HF DBRX folder as transformers writes it, in several shards, with a tokenizer-like file."""
    torch.manual_seed(seed)
    model = transformers.DbrxForCausalLM(transformers.DbrxConfig(**cfg)).to(dtype)
    model.save_pretrained(path, max_shard_size=shard)
    (path / 'tokenizer_config.json').write_text('{"model_max_length": 64}\n')
    return model


def read_hf_weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob('*.safetensors')):
        out.update(load_file(f))
    return out


def assert_bytes_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp('hf') / 'dbrx-tiny'
    build_hf_dir(path)
    assert len(list(path.glob('*.safetensors'))) > 3
    return path


def leftovers(folder):
    return [p.name for p in folder.iterdir() if '.partial-' in p.name or '.old-' in p.name or p.name.endswith('.lock')]


def test_round_trip_is_byte_identical_and_loads_in_transformers(hf_dir, tmp_path):
    pt = hf.hf_to_composer(hf_dir, tmp_path / 'dbrx.pt')
    assert zipfile.ZipFile(pt).testzip() is None  # the CRCs left empty by skip_data were filled in
    ckpt = torch.load(pt, weights_only=True)
    assert all(k.startswith('model.transformer.') or k == 'model.lm_head.weight' for k in ckpt['state']['model'])

    out = hf.composer_to_hf(pt, tmp_path / 'export', shard_size='100KB')
    assert_bytes_equal(read_hf_weights(hf_dir), read_hf_weights(out))
    assert (out / 'tokenizer_config.json').read_bytes() == (hf_dir / 'tokenizer_config.json').read_bytes()
    assert (out / 'generation_config.json').read_bytes() == (hf_dir / 'generation_config.json').read_bytes()
    index = json.loads((out / hf.HF_INDEX).read_text())
    assert set(index['weight_map']) == set(hf.expected_shapes(DbrxConfig.from_dict(CFG)))

    original = transformers.DbrxForCausalLM.from_pretrained(hf_dir, torch_dtype='auto')
    model, info = transformers.DbrxForCausalLM.from_pretrained(out, torch_dtype='auto', output_loading_info=True)
    assert info['missing_keys'] == [] and info['unexpected_keys'] == [] and info['mismatched_keys'] == []
    assert model.dtype == torch.bfloat16
    assert model.config.to_dict()['attn_config'] == original.config.to_dict()['attn_config']
    assert model.config.to_dict()['ffn_config'] == original.config.to_dict()['ffn_config']
    assert leftovers(tmp_path) == []


def test_composer_trainer_starts_from_the_converted_checkpoint(hf_dir, tmp_path):
    """What a YAML with load_path + load_weights_only does: Composer loads state['model'] into the dbrx model."""
    from composer import Trainer
    pt = hf.hf_to_composer(hf_dir, tmp_path / 'dbrx.pt', dtype=torch.float32)
    model = ComposerDbrxCausalLM(**CFG)
    Trainer(model=model, load_path=str(pt), load_weights_only=True, load_strict_model_weights=True, device='cpu')
    reference = read_hf_weights(hf_dir)
    for key, p in model.model.named_parameters():
        assert torch.equal(p.detach(), reference[key].float()), key


def test_pretrained_hf_dir_fills_config_and_loads_weights(hf_dir):
    model = ComposerDbrxCausalLM(pretrained_hf_dir=str(hf_dir), ffn_config={'moe_loss_weight': 0.01})
    assert model.config.d_model == CFG['d_model'] and model.config.ffn_config.moe_top_k == 2
    assert model.config.ffn_config.moe_loss_weight == 0.01  # a training choice: the YAML's value wins
    reference = transformers.DbrxForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, CFG['vocab_size'], (2, 11))
    model.eval()
    with torch.no_grad():
        diff = (model({'input_ids': ids}).logits - reference(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_pretrained_hf_dir_on_meta_loads_as_fsdp_materialises(hf_dir):
    """init_device meta: Composer's FSDP moves each module off meta and calls model.param_init_fn(module); done by
    hand here (Composer's FSDP needs CUDA)."""
    model = ComposerDbrxCausalLM(pretrained_hf_dir=str(hf_dir), init_device='meta')
    net = model.model
    for module in net.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device='cpu', recurse=False)
            net.param_init_fn(module)
    reference = read_hf_weights(hf_dir)
    for key, p in net.named_parameters():
        assert torch.equal(p.detach(), reference[key].float()), key


def test_yaml_that_disagrees_with_config_json_lists_every_difference(hf_dir):
    with pytest.raises(ValueError) as e:
        ComposerDbrxCausalLM(pretrained_hf_dir=str(hf_dir), d_model=64, attn_config={'kv_n_heads': 3},
                             ffn_config={'moe_top_k': 2})
    msg = str(e.value)
    assert 'd_model: YAML has 64' in msg and 'has 48' in msg
    assert 'attn_config.kv_n_heads: YAML has 3' in msg
    assert 'moe_top_k' not in msg  # agrees


def test_config_source_from_training_yaml(hf_dir, tmp_path):
    yaml = tmp_path / 'run.yaml'
    yaml.write_text(textwrap.dedent(f"""\
        variables:
          hf: {hf_dir}
        model:
          name: dbrx
          init_device: cpu
          pretrained_hf_dir: ${{variables.hf}}
          max_seq_len: 32
        """))
    cfg = hf.read_config_source(yaml)
    assert cfg.max_seq_len == 32 and cfg.n_heads == CFG['n_heads']
    from_dir, expected = hf.read_config_source(hf_dir), DbrxConfig.from_dict(CFG)
    assert from_dir.attn_config == expected.attn_config and from_dir.num_params() == expected.num_params()


def make_broken_hf_dir(src, dst, edit):
    """A copy of an HF folder as one safetensors file after ``edit(state_dict)``."""
    dst.mkdir()
    state = read_hf_weights(src)
    edit(state)
    save_file(state, dst / hf.HF_SINGLE_FILE, metadata={'format': 'pt'})
    (dst / hf.HF_CONFIG).write_bytes((src / hf.HF_CONFIG).read_bytes())


def test_unmapped_missing_and_misshaped_keys_are_all_listed(hf_dir, tmp_path):
    def edit(state):
        state['transformer.blocks.0.ffn.experts.mlp.bias'] = torch.zeros(3)
        del state['lm_head.weight']
        state['transformer.blocks.1.ffn.router.layer.weight'] = torch.zeros(7, CFG['d_model'])

    make_broken_hf_dir(hf_dir, tmp_path / 'bad', edit)
    with pytest.raises(hf.KeyMismatchError) as e:
        hf.hf_to_composer(tmp_path / 'bad', tmp_path / 'out.pt')
    msg = str(e.value)
    assert '1 unmapped key(s)' in msg and 'transformer.blocks.0.ffn.experts.mlp.bias' in msg
    assert '1 missing key(s): lm_head.weight' in msg
    assert 'transformer.blocks.1.ffn.router.layer.weight has [7, 48], config expects [8, 48]' in msg
    assert not (tmp_path / 'out.pt').exists() and leftovers(tmp_path) == []


def without_carried_config(pt, path):
    """The weights of ``pt`` as Composer itself saves them: no config.json or tokenizer files carried."""
    torch.save({'state': torch.load(pt, weights_only=True)['state']}, path)
    return path


def test_composer_checkpoint_checked_against_the_given_config(hf_dir, tmp_path):
    """A Composer checkpoint that carries no config (as Composer writes them) is checked key by key against --config;
    one that carries its config.json refuses a --config that contradicts it."""
    pt = hf.hf_to_composer(hf_dir, tmp_path / 'dbrx.pt')
    plain = without_carried_config(pt, tmp_path / 'plain.pt')
    wrong = DbrxConfig.from_dict({**CFG, 'n_layers': 3})
    with pytest.raises(hf.KeyMismatchError, match=r'missing key\(s\): transformer.blocks.2'):
        hf.composer_to_hf(plain, tmp_path / 'export', config=wrong)
    with pytest.raises(ValueError, match=r'contradicts the architecture the checkpoint carries on 1 field\(s\): '
                                         r'n_layers: config= has 3, the config.json carried by .*dbrx.pt has 2'):
        hf.composer_to_hf(pt, tmp_path / 'export', config=wrong)
    assert not (tmp_path / 'export').exists() and leftovers(tmp_path) == []


def test_export_refuses_what_transformers_cannot_express(hf_dir, tmp_path):
    pt = without_carried_config(hf.hf_to_composer(hf_dir, tmp_path / 'dbrx.pt'), tmp_path / 'plain.pt')
    odd_eps = DbrxConfig.from_dict({**CFG, 'layer_norm_eps': 1e-6})
    with pytest.raises(ValueError, match=r'layer_norm_eps \(1e-06\) must be 1e-05'):
        hf.composer_to_hf(pt, tmp_path / 'export', config=odd_eps)
    assert not (tmp_path / 'export').exists() and leftovers(tmp_path) == []


def test_failure_mid_write_leaves_no_output(hf_dir, tmp_path, monkeypatch):
    pt = hf.hf_to_composer(hf_dir, tmp_path / 'dbrx.pt')
    import safetensors.torch
    real_save, calls = safetensors.torch.save_file, []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError('disk full (simulated)')
        return real_save(tensors, path, metadata)

    monkeypatch.setattr(safetensors.torch, 'save_file', failing_save)
    with pytest.raises(OSError, match='simulated'):
        hf.composer_to_hf(pt, tmp_path / 'export', shard_size='100KB')
    assert len(calls) == 2
    assert not (tmp_path / 'export').exists() and leftovers(tmp_path) == []

    monkeypatch.setattr(hf.convert, '_fix_zip_crcs', lambda path: (_ for _ in ()).throw(OSError('killed (simulated)')))
    with pytest.raises(OSError, match='simulated'):
        hf.hf_to_composer(hf_dir, tmp_path / 'again.pt')
    assert not (tmp_path / 'again.pt').exists() and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(hf_dir, tmp_path):
    pt = hf.hf_to_composer(hf_dir, tmp_path / 'dbrx.pt')
    with pytest.raises(OutputError, match='holds an earlier output of foundry-dbrx convert hf-to-composer; pass '
                                          '--overwrite to replace it'):
        hf.hf_to_composer(hf_dir, pt)
    hf.hf_to_composer(hf_dir, pt, dtype=torch.float32, overwrite=True)
    hf.composer_to_hf(pt, tmp_path / 'export')
    with pytest.raises(OutputError, match='holds an earlier output of foundry-dbrx HF export; pass --overwrite'):
        hf.composer_to_hf(pt, tmp_path / 'export')
    hf.composer_to_hf(pt, tmp_path / 'export', dtype=torch.float32, overwrite=True)
    assert read_hf_weights(tmp_path / 'export')['lm_head.weight'].dtype == torch.float32
    assert leftovers(tmp_path) == []


def test_parse_size():
    assert hf.parse_size('5GB') == 5 * 10**9 and hf.parse_size('2GiB') == 2 * 2**30
    assert hf.parse_size('100KB') == 100_000 and hf.parse_size(123) == 123
    with pytest.raises(ValueError, match='shard_size'):
        hf.parse_size('lots')


def test_cli_round_trip_with_progress(hf_dir, tmp_path, capsys):
    from foundry_dbrx.cli import main
    # The installed console script, once (a child process costs ~5 s of imports); the rest in-process.
    r = subprocess.run([str(VENV_BIN / 'foundry-dbrx'), 'convert', 'hf-to-composer', str(hf_dir),
                        str(tmp_path / 'dbrx.pt')], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'load_path' in r.stdout and '100%' in r.stderr  # the progress bar went to stderr
    args = ['convert', 'composer-to-hf', str(tmp_path / 'dbrx.pt'), str(tmp_path / 'export')]
    assert main(args + ['--shard-size', '100KB']) == 0
    assert_bytes_equal(read_hf_weights(hf_dir), read_hf_weights(tmp_path / 'export'))
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith('foundry-dbrx convert: error: OUT_DIR ') and len(err.strip().splitlines()) == 1, err
    assert 'export holds an earlier output of foundry-dbrx HF export; pass --overwrite to replace it' in err


# Peak memory of the streamed conversion, measured in a child process: VmHWM reset just before the conversion
# (clear_refs 5), read just after; the difference to VmRSS before is what the conversion itself held at its peak.
# A warm-up conversion of a tiny model first pages in the library code the conversion runs (about 9 MB of libtorch
# and numpy pages on first use), which would otherwise count as data.
_MEASURE = textwrap.dedent("""\
    import json, pathlib, re, sys, tempfile, torch
    from foundry_dbrx import hf
    def status(field):
        return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024
    def convert(direction, src, dst):
        if direction == 'hf-to-composer':
            hf.hf_to_composer(src, dst)
        elif direction == 'composer-to-hf':
            hf.composer_to_hf(src, dst, shard_size='8MB')
        else:  # the naive way, for comparison: everything in memory at once
            from safetensors.torch import load_file
            state = {}
            for f in sorted(pathlib.Path(src).glob('*.safetensors')):
                state.update(load_file(f))
            torch.save({'state': {'model': state}}, dst)
    # argv: the warm-up source, then (direction, source, destination) triples measured one after the other
    warm_src, jobs = sys.argv[1], [sys.argv[i:i + 3] for i in range(2, len(sys.argv), 3)]
    warm = pathlib.Path(tempfile.mkdtemp())
    convert('hf-to-composer', warm_src, warm / 'warm.pt')
    convert('composer-to-hf', warm / 'warm.pt', warm / 'export')
    peaks = []
    for direction, src, dst in jobs:
        before = status('VmRSS')
        open('/proc/self/clear_refs', 'w').write('5')
        convert(direction, src, dst)
        peaks.append(status('VmHWM') - before)
    print(json.dumps(peaks))
    """)


def _peak_deltas(warm_src, *jobs) -> list[int]:
    args = [str(warm_src)] + [str(a) for job in jobs for a in job]
    r = subprocess.run([sys.executable, '-c', _MEASURE, *args], capture_output=True, text=True,
                       env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_streamed_conversion_peak_memory_follows_the_largest_shard(tmp_path):
    """~113 MB of fp32 weights in 8 MB shards: each direction's peak stays within a few shards, far below the model,
    while the naive conversion holds the whole model."""
    cfg = dict(d_model=256, n_heads=8, n_layers=8, vocab_size=4096, max_seq_len=64,
               attn_config=dict(kv_n_heads=2), ffn_config=dict(ffn_hidden_size=512, moe_num_experts=8, moe_top_k=2))
    build_hf_dir(tmp_path / 'hf', cfg=cfg, dtype=torch.float32, shard='8MB')
    (tmp_path / 'hf' / 'tokenizer_config.json').unlink()
    shards = sorted((tmp_path / 'hf').glob('*.safetensors'))
    model_bytes = sum(f.stat().st_size for f in shards)
    largest = max(f.stat().st_size for f in shards)
    assert model_bytes > 100e6 and len(shards) >= 12

    build_hf_dir(tmp_path / 'warm', dtype=torch.float32)
    # One child process, three measurements; the naive one last, so memory the streamed ones leave cached in the
    # allocator cannot hide their peaks (it could only make the naive one look smaller, and it still shows the model).
    to_composer, to_hf, naive = _peak_deltas(tmp_path / 'warm',
                                             ('hf-to-composer', tmp_path / 'hf', tmp_path / 'dbrx.pt'),
                                             ('composer-to-hf', tmp_path / 'dbrx.pt', tmp_path / 'export'),
                                             ('naive', tmp_path / 'hf', tmp_path / 'naive.pt'))
    print(f'model {model_bytes / 1e6:.1f} MB in {len(shards)} shards, largest {largest / 1e6:.1f} MB; peak above '
          f'baseline: hf-to-composer {to_composer / 1e6:.1f} MB, composer-to-hf {to_hf / 1e6:.1f} MB, '
          f'naive load-all + torch.save {naive / 1e6:.1f} MB')
    assert naive > 0.9 * model_bytes  # the measurement does see a whole model
    assert to_composer < 3 * largest and to_hf < 3 * 8e6
    assert_bytes_equal(read_hf_weights(tmp_path / 'hf'), read_hf_weights(tmp_path / 'export'))


def test_export_keeps_the_source_context_length():
    """Fine-tuning at a shorter max_seq_len over pretrained_hf_dir must not shrink the exported model's context."""
    from foundry_dbrx import DbrxConfig
    from foundry_dbrx.hf import hf_config_dict
    from tests.conftest import tiny_config

    cfg = DbrxConfig.from_dict(tiny_config(max_seq_len=64))
    assert hf_config_dict(cfg, base={'max_seq_len': 32768})['max_seq_len'] == 32768
    assert hf_config_dict(cfg)['max_seq_len'] == 64
