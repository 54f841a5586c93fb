"""The same YAML and seed give the same run: two training processes of the tiny model on the CPU, one of them beside
a busy loop that takes a core, record bit-identical losses at every step.

Timing must not reach the math. It did: the eager MoE backend gathered each token K times with ``x[idx]``, whose
backward adds the K gradients into one row with parallel atomic adds on CPU, in an order set by which thread got
there first, so a busy machine changed the low bits of the gradients and, from there, every later loss. The
dispatcher (foundry_dbrx/moe/dispatch.py) now makes every gradient a gather, with no atomics.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, subprocess_env

STEPS = 6


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    from foundry_dbrx.data.prep import PrepConfig, prep_data

    out = tmp_path_factory.mktemp('repro') / 'data'
    prep_data(PrepConfig(default=True, out=str(out), max_tokens=60_000, max_seq_len=128, progress=False, workers=1))
    return out


@pytest.fixture
def busy_core():
    """Another process that keeps a core busy for the test's duration (the tests run on 2 cores)."""
    busy = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
    yield
    busy.kill()
    busy.wait()


def test_moe_layer_backward_is_bitwise_repeatable_beside_a_busy_loop(busy_core):
    """The cause, pinned: the same forward and backward of one MoE layer's experts, dispatch and combine included
    (the tiny model's shape, 1024 tokens, two threads), gives bit-identical gradients 40 times over while another
    process competes for the cores."""
    from foundry_dbrx.moe.dispatch import LocalDispatcher
    from foundry_dbrx.moe.experts import eager_experts
    from foundry_dbrx.moe.router import Routing

    gen = torch.Generator().manual_seed(0)
    t, d, f, e, k = 1024, 64, 128, 16, 4
    x_TD = torch.randn(t, d, generator=gen, requires_grad=True)
    weights = [(torch.randn(e, f, d, generator=gen) * 0.05).requires_grad_() for _ in range(3)]
    probs_TE = torch.randn(t, e, generator=gen).softmax(-1)
    weights_TK, experts_TK = probs_TE.topk(k, dim=-1)
    routing = Routing(probs_TE, weights_TK.requires_grad_(), experts_TK)
    dy_TD = torch.randn(t, d, generator=gen)
    assert torch.get_num_threads() > 1  # with one thread nothing could race
    dispatcher = LocalDispatcher(e)

    seen = set()
    for _ in range(40):
        for leaf in (x_TD, routing.weights_TK, *weights):
            leaf.grad = None
        rows = dispatcher.dispatch(x_TD, routing)
        y_TD = dispatcher.combine(eager_experts(rows.x_RD, rows.w_R, rows.offs_El, *weights), rows.state)
        y_TD.backward(dy_TD)
        seen.add(tuple(hashlib.sha1(g.grad.numpy().tobytes()).hexdigest()
                       for g in (x_TD, routing.weights_TK, *weights)))
    assert len(seen) == 1, f'{len(seen)} different gradients from 40 identical backward passes'


def _start(corpus, folder):
    cmd = [sys.executable, '-m', 'foundry_dbrx.train', str(ROOT / 'yamls' / 'dbrx-tiny.yaml'),
           f'variables.data_local={corpus}', f'max_duration={STEPS}ba', 'eval_interval=1000ba',
           'console_log_interval=1000ba', 'save_folder=null', 'autoresume=false',
           f'callbacks.dbrx_run_summary.json_path={folder}/summary.json',
           f'loggers.mlflow.tracking_uri={folder}/mlruns']
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _losses(proc, folder) -> dict[int, float]:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return {step: loss for step, loss in json.loads((folder / 'summary.json').read_text())['losses']}


def test_two_processes_give_identical_losses_beside_a_busy_loop(corpus, tmp_path, busy_core):
    """The tiny model of yamls/dbrx-tiny.yaml, trained by two processes at once while a third keeps a core busy."""
    runs = _start(corpus, tmp_path / 'a'), _start(corpus, tmp_path / 'b')
    first, second = _losses(runs[0], tmp_path / 'a'), _losses(runs[1], tmp_path / 'b')
    assert sorted(first) == list(range(1, STEPS + 1))
    differ = {s: (first[s], second[s]) for s in first if first[s] != second.get(s)}
    assert not differ, f'losses differ at {len(differ)} of {STEPS} steps (step: first run, second run): {differ}'
    assert len(set(first.values())) == STEPS  # the runs trained (a different loss each step), not a constant
