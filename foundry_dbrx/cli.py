"""The ``foundry-dbrx`` command. Each subcommand lives in its own module, listed once in ``SUBCOMMANDS``.

A subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when its
subcommand runs, so ``foundry-dbrx --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# name -> (module, one-line help)
SUBCOMMANDS = {
    'prep-data': ('foundry_dbrx.data.prep', 'tokenize text into MDS shards that LLM Foundry\'s text loader reads'),
    'train': ('foundry_dbrx.train', 'train from a YAML (same as python -m foundry_dbrx.train)'),
    'convert': ('foundry_dbrx.hf.cli', 'convert checkpoints: hf-to-composer HF_DIR OUT.pt | composer-to-hf CKPT OUT_DIR'),
    'plan': ('foundry_dbrx.plan', 'per-GPU memory, FLOPs and microbatch size of a training YAML on N GPUs'),
    'plot': ('foundry_dbrx.plot', 'PNGs of a run\'s losses and expert load from its MLflow store: plot RUN'),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='foundry-dbrx', description='Train DBRX-class MoE models.')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, (_, help_text) in SUBCOMMANDS.items():
        # Arguments are added in main(), for the chosen subcommand only.
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage / the error and exits
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    sub = argparse.ArgumentParser(prog=f'foundry-dbrx {argv[0]}', description=SUBCOMMANDS[argv[0]][1])
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(argv[1:])) or 0)


if __name__ == '__main__':
    sys.exit(main())
