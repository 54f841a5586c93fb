"""Train from a YAML: ``python -m foundry_dbrx.train YAML [key=value ...]`` (also ``foundry-dbrx train`` and
``composer -n N -m foundry_dbrx.train YAML``).

A thin layer over LLM Foundry's ``train``: it makes sure foundry-dbrx's registrations exist even where the
package is only on ``PYTHONPATH`` (no entry points), adds the run-summary and divergence-guard callbacks, then hands
over. A diverging run ends with one line naming the step (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

__all__ = ['load_config', 'main']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('yaml', help='training YAML (LLM Foundry format, model.name: dbrx)')
    parser.add_argument('overrides', nargs='*', help='dotted overrides, e.g. max_duration=20ba model.n_layers=2')


def load_config(yaml_path: str, overrides: Sequence[str] = ()):
    """The YAML with command-line overrides merged in, plus the run-summary and divergence-guard callbacks and,
    for the dbrx model, the ``dbrx_parallelize`` callback."""
    from omegaconf import OmegaConf as om

    if not os.path.isfile(yaml_path):
        raise FileNotFoundError(f'training YAML {yaml_path!r} does not exist')
    cfg = om.load(yaml_path)
    bad = [o for o in overrides if '=' not in o]
    if bad:
        raise ValueError(f'overrides {bad} must look like key=value (for example max_duration=10ba)')
    if overrides:
        cfg = om.merge(cfg, om.from_dotlist(list(overrides)))
    callbacks = cfg.get('callbacks') or {}
    added = ['dbrx_run_summary', 'dbrx_divergence_guard']
    if (cfg.get('model') or {}).get('name', 'dbrx') == 'dbrx':
        added.append('dbrx_parallelize')  # the dbrx model's plan; other models (mpt_dbrx_moe) keep Composer's
    for name in added:
        if name not in callbacks:
            callbacks = om.merge(callbacks, {name: {}})
    fsdp = cfg.get('fsdp_config') or {}
    if 'dbrx_parallelize' in callbacks and fsdp.get('activation_checkpointing') and \
            'activation_checkpointing' not in (callbacks.get('dbrx_parallelize') or {}):
        # LLM Foundry drops fsdp_config on one process, and activation checkpointing with it: keep the YAML's intent
        callbacks = om.merge(callbacks, {'dbrx_parallelize': {'activation_checkpointing': True}})
    cfg.callbacks = callbacks
    return cfg


def _wants_fsdp2(cfg) -> bool:
    """Expert parallelism and replication are applied under FSDP2 (foundry_dbrx/parallelize.py)."""
    training = (cfg.get('model') or {}).get('training') or {}
    return (cfg.get('fsdp_config') is not None and (int(training.get('expert_parallel_degree', 1)) > 1
                                                    or int(training.get('data_parallel_replicate_degree', 1)) > 1))


def run(args: argparse.Namespace) -> int:
    from llmfoundry.command_utils import train

    from foundry_dbrx.registry import register_all

    from foundry_dbrx.divergence import DivergenceError

    register_all()
    cfg = load_config(args.yaml, args.overrides)
    if _wants_fsdp2(cfg) and os.environ.get('FSDP_VERSION', '1') != '2':
        # Composer 0.32 picks FSDP2 from this variable when it builds the Trainer, after this point.
        os.environ['FSDP_VERSION'] = '2'
        print('[foundry-dbrx] expert parallelism / replication: FSDP2 (FSDP_VERSION=2)', flush=True)
    try:
        train(cfg)
    except DivergenceError as e:
        print(f'foundry-dbrx train: error: {e}', file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m foundry_dbrx.train', description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
