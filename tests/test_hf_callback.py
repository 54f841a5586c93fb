"""dbrx_hf_checkpointer during a Composer run, the FSDP gather it relies on, and FSDP sharded checkpoints as
converter input.

Composer's own FSDP wrapping needs CUDA, so the FSDP test wraps the net the way Composer does (one FSDP unit per
block from ``fsdp_wrap_fn``, a root unit around the net) with torch's FSDP on CPU over gloo, in two processes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from foundry_dbrx import hf
from foundry_dbrx.callbacks import DbrxHFCheckpointer
from foundry_dbrx.composer_model import ComposerDbrxCausalLM
from foundry_dbrx.config import DbrxConfig
from foundry_dbrx.model import DbrxForCausalLM

from conftest import ROOT, subprocess_env

CFG = dict(d_model=32, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=32,
           attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=500000.0),
           ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2, moe_loss_weight=0.05))


def read_hf_weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob('*.safetensors')):
        out.update(load_file(f))
    return out


def test_callback_writes_hf_checkpoints_during_training(tmp_path):
    from composer import Trainer
    torch.manual_seed(0)
    model = ComposerDbrxCausalLM(**CFG)
    g = torch.Generator().manual_seed(0)
    data = [{'input_ids': torch.randint(0, CFG['vocab_size'], (16,), generator=g)} for _ in range(8)]
    callback = DbrxHFCheckpointer(save_folder=str(tmp_path / '{run_name}' / 'hf'), save_interval='2ba',
                                  shard_size='20KB')
    trainer = Trainer(model=model, train_dataloader=DataLoader(data, batch_size=2), max_duration='4ba',
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2), callbacks=[callback],
                      save_folder=str(tmp_path / 'ckpt'), save_interval='4ba', device='cpu', run_name='run',
                      progress_bar=False, log_to_console=False, seed=0)
    trainer.fit()

    assert callback.saved == [tmp_path / 'run' / 'hf' / 'ba2', tmp_path / 'run' / 'hf' / 'ba4']
    final = tmp_path / 'run' / 'hf' / 'ba4'
    assert (final / hf.HF_INDEX).is_file() and len(list(final.glob('*.safetensors'))) > 1
    reference, info = transformers.DbrxForCausalLM.from_pretrained(final, output_loading_info=True)
    assert info['missing_keys'] == [] and info['unexpected_keys'] == []
    ids = torch.randint(0, CFG['vocab_size'], (2, 16))
    model.eval()
    with torch.no_grad():
        diff = (model({'input_ids': ids}).logits - reference.eval()(ids).logits).abs().max().item()
    assert diff <= 1e-5  # the folder holds the weights as they were at the end of training
    first, last = read_hf_weights(tmp_path / 'run' / 'hf' / 'ba2'), read_hf_weights(final)
    assert not torch.equal(first['lm_head.weight'], last['lm_head.weight'])

    # Composer's own checkpoint of the same step, converted offline, is the same export byte for byte.
    exported = hf.composer_to_hf(tmp_path / 'ckpt' / 'ep0-ba4-rank0.pt', tmp_path / 'converted', config=model.config)
    converted = read_hf_weights(exported)
    assert sorted(converted) == sorted(last)
    assert all(torch.equal(converted[k], last[k]) for k in last)


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match='precision'):
        DbrxHFCheckpointer(save_folder='x', save_interval='1ba', precision='fp8')
    with pytest.raises(ValueError, match='local folder'):
        DbrxHFCheckpointer(save_folder='s3://bucket/x', save_interval='1ba')


def test_callback_is_registered_in_llmfoundry():
    """Through the installed entry point (read from the package metadata, not an in-code registration)."""
    from llmfoundry import registry
    assert registry.callbacks.get_entry_point('dbrx_hf_checkpointer') is DbrxHFCheckpointer


# Runs in two processes. It imports no Composer (a child process would spend ~15 s importing it): ``Holder`` has
# ComposerDbrxCausalLM's module structure (the net as ``.model``), which is all the state dict keys depend on.
_WORKER = textwrap.dedent("""\
    import functools, json, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torch.nn.functional as F
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
    from foundry_dbrx import DbrxConfig
    from foundry_dbrx.hf import gather_full_state_dict, save_hf_checkpoint
    from foundry_dbrx.model import DbrxForCausalLM
    from foundry_dbrx.parallelize import attach_composer_hooks

    class Holder(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.model = net

    rank, out, cfg = int(sys.argv[1]), Path(sys.argv[2]), DbrxConfig.from_dict(json.loads(sys.argv[3]))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    torch.manual_seed(0)
    net = attach_composer_hooks(DbrxForCausalLM(cfg))
    holder = Holder(net)
    # as Composer's FSDP does: the net wrapped, one unit per block chosen by its fsdp_wrap_fn
    holder.model = FSDP(net, auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=net.fsdp_wrap_fn),
                        device_id=torch.device('cpu'), use_orig_params=True)
    # one SGD step on this rank's half of the batch: the gathered weights are then not the initial ones
    ids = torch.load(out / 'batch.pt')[rank * 2:(rank + 1) * 2]
    logits = holder.model(ids).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    torch.optim.SGD(holder.parameters(), lr=0.5).step()
    # what dbrx_hf_checkpointer does on every rank: gather, rank 0 writes
    state = gather_full_state_dict(holder)
    assert (state is None) == (rank != 0)
    if rank == 0:
        save_hf_checkpoint(state, cfg, out / 'gathered')
    # what Composer writes with fsdp state_dict_type: sharded (cpu_offload off: the weights are on CPU already)
    sharded = get_model_state_dict(holder, options=StateDictOptions(full_state_dict=False))
    dcp.save({'state': {'model': sharded, 'rank_zero_seed': 0}}, storage_writer=dcp.FileSystemWriter(out / 'sharded'))
    dist.barrier()
    dist.destroy_process_group()
    """)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_fsdp_gather_and_sharded_checkpoint_conversion(tmp_path):
    ids = torch.randint(0, CFG['vocab_size'], (4, 16), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / 'batch.pt')
    env = subprocess_env(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()), OMP_NUM_THREADS='1')
    procs = [subprocess.Popen([sys.executable, '-c', _WORKER, str(rank), str(tmp_path), json.dumps(CFG)], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), '\n'.join(logs)
    assert len(list((tmp_path / 'sharded').glob('__*_0.distcp'))) == 2

    # Single-process reference: same init, the whole batch (FSDP averages the two halves' gradients).
    torch.manual_seed(0)
    reference = DbrxForCausalLM(DbrxConfig.from_dict(CFG))
    initial = {k: v.detach().clone() for k, v in reference.named_parameters()}  # HF holds the parameters
    logits = reference(ids).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    expected = {k: v.detach() for k, v in reference.named_parameters()}

    gathered = read_hf_weights(tmp_path / 'gathered')
    assert sorted(gathered) == sorted(expected)
    worst = max((gathered[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6
    assert all(not torch.equal(expected[k], initial[k]) for k in expected)  # the step changed every weight

    # The sharded (DCP) checkpoint converts to the same HF folder, byte for byte.
    out = hf.composer_to_hf(tmp_path / 'sharded', tmp_path / 'from_sharded', config=DbrxConfig.from_dict(CFG))
    converted = read_hf_weights(out)
    assert all(torch.equal(converted[k], gathered[k]) for k in gathered)
    _, info = transformers.DbrxForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info['missing_keys'] == [] and info['unexpected_keys'] == []


def test_finetune_recipe_starts_from_hf_and_writes_hf_checkpoints(tmp_path):
    """yamls/dbrx-finetune-hf.yaml through LLM Foundry's train, in this process, on a tiny HF DBRX with DBRX's
    vocabulary: the run starts from the HF weights and its HF checkpoints load in transformers."""
    from llmfoundry.command_utils import train

    from foundry_dbrx.cli import main
    from foundry_dbrx.registry import register_all
    from foundry_dbrx.train import load_config

    corpus = tmp_path / 'corpus'
    assert main(['prep-data', '--default', '--out', str(corpus), '--max-tokens', '20000', '--max-seq-len', '64',
                 '--no-progress', '--workers', '1']) == 0
    torch.manual_seed(0)
    hf_cfg = dict(CFG, vocab_size=100352, max_seq_len=2048)
    original = transformers.DbrxForCausalLM(transformers.DbrxConfig(**hf_cfg))
    original.save_pretrained(tmp_path / 'hf-dbrx')

    register_all()
    overrides = [f'variables.hf_dir={tmp_path / "hf-dbrx"}', f'variables.data_local={corpus}',
                 'variables.max_seq_len=64', 'max_duration=2ba', 'global_train_batch_size=2',
                 'device_train_microbatch_size=2', 'eval_first=false', 'eval_interval=2ba', 'eval_subset_num_batches=1',
                 'run_name=ft', f'save_folder={tmp_path}/ckpt', 'save_interval=2ba',
                 f'callbacks.dbrx_hf_checkpointer.save_folder={tmp_path}/hf-out', 'callbacks.dbrx_hf_checkpointer.save_interval=2ba',
                 'callbacks.dbrx_hf_checkpointer.precision=float32', 'scheduler.t_warmup=0ba',
                 f'loggers.mlflow.tracking_uri={tmp_path}/mlruns']
    trainer = train(load_config(str(ROOT / 'yamls' / 'dbrx-finetune-hf.yaml'), overrides))
    assert trainer.state.model.config.d_model == CFG['d_model']  # filled in from config.json
    assert trainer.state.model.config.max_seq_len == 64  # the YAML's training choice
    trainer.close()

    export = tmp_path / 'hf-out' / 'ba2'
    tuned, info = transformers.DbrxForCausalLM.from_pretrained(export, output_loading_info=True)
    assert info['missing_keys'] == [] and info['unexpected_keys'] == []
    before, after = original.state_dict(), tuned.state_dict()
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    # Two Adam steps at lr <= 1e-5 move a weight by about the learning rate each: the run started from the HF weights
    # (a fresh init would be ~0.02 away) and did train.
    assert 0 < moved <= 1e-4
