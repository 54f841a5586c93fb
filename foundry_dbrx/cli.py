"""The ``foundry-dbrx`` command. Each subcommand lives in its own module, listed once in ``SUBCOMMANDS``.

A subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when its
subcommand runs, so ``foundry-dbrx --help`` stays fast. Ctrl-C ends any of them with one line and status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import signal
import sys
import threading
from typing import Iterator, Optional, Sequence

# name -> (module, one-line help, examples, what Ctrl-C leaves behind when the module itself does not say)
SUBCOMMANDS = {
    'prep-data': ('foundry_dbrx.data.prep', 'tokenize text into MDS shards that LLM Foundry\'s text loader reads',
                  'examples:\n  foundry-dbrx prep-data --default --out ./data/default\n'
                  '  foundry-dbrx prep-data docs/ more.jsonl --out s3://bucket/my-data --max-seq-len 2048',
                  'nothing was written'),
    'train': ('foundry_dbrx.train', 'train from a YAML (same as python -m foundry_dbrx.train)',
              'examples:\n  foundry-dbrx train yamls/dbrx-tiny.yaml max_duration=20ba\n'
              '  composer -n 2 -m foundry_dbrx.train yamls/dbrx-tiny.yaml\n'
              'Ctrl-C stops at the end of the current step and saves a checkpoint; rerunning resumes (autoresume).\n'
              'FOUNDRY_DBRX_DETERMINISTIC=1 makes GPU runs bit-reproducible (PyTorch deterministic kernels, slower);\n'
              'CPU runs are reproducible without it.',
              'nothing was trained or written'),
    'convert': ('foundry_dbrx.hf.cli', 'convert checkpoints: hf-to-composer HF_DIR OUT.pt | composer-to-hf CKPT OUT_DIR',
                'examples:\n  foundry-dbrx convert hf-to-composer ./dbrx-base ./dbrx-base.pt\n'
                '  foundry-dbrx convert composer-to-hf runs/dbrx-tiny/checkpoints/latest-rank0.pt ./dbrx-tiny-hf '
                '--config yamls/dbrx-tiny.yaml\n'
                '  foundry-dbrx convert hf-to-composer --help   (the options of each direction)',
                'the output was not written (its partial copy was removed)'),
    'plan': ('foundry_dbrx.plan', 'per-GPU memory, FLOPs and microbatch size of a training YAML on N GPUs',
             'examples:\n  foundry-dbrx plan yamls/dbrx-132b.yaml --gpus 64 --ep 8\n'
             '  foundry-dbrx plan yamls/dbrx-gpu-small.yaml --gpus 8 --microbatch 4',
             'nothing was written'),
    'plot': ('foundry_dbrx.plot', 'PNGs of a run\'s losses and expert load from its MLflow store: plot RUN',
             'examples:\n  foundry-dbrx plot dbrx-tiny   (the run of make train, from ./mlruns)\n'
             '  foundry-dbrx plot my-run --tracking-uri http://host:5000 --out ./plots',
             'the PNGs not yet written are missing'),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default in ``--help`` (unless its help already says it), and examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if (not action.option_strings or action.nargs == 0 or 'default' in text or action.default is None
                or action.default is argparse.SUPPRESS):
            return text
        return f'{text} (default: %(default)s)'


@contextlib.contextmanager
def ctrl_c_exits(message: str) -> Iterator[None]:
    """For a block that only imports (torch, Streaming, LLM Foundry: seconds): Ctrl-C prints ``message`` and ends
    the process at once, with status 130. A KeyboardInterrupt raised inside a C extension's initialisation leaves it
    half-loaded (the next import of it then fails with an unrelated error and a traceback), and some libraries
    swallow it; nothing has been written yet, so there is nothing to clean up. The handler in place before the
    block is back after it, also when an import (Composer's) replaced it."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield
        return

    def stop(signum: int, frame: object) -> None:
        sys.stdout.flush()
        if message:
            os.write(sys.stderr.fileno(), f'\n{message}\n'.encode())
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def freeze_imports() -> None:
    """Moves what exists now (after the heavy imports: torch, Streaming, LLM Foundry, some 700k objects) out of the
    garbage collector's way: they live until exit anyway, and every later collection, the one at exit included,
    skipped them. Exiting a training process took about 5 s of CPU, 0.7 s frozen (measured on a busy 2-core machine):
    that matters when Ctrl-C came through Composer's launcher, which kills ranks still running after 30 s."""
    gc.collect()  # nothing that is already garbage gets frozen
    gc.freeze()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='foundry-dbrx', description='Train DBRX-class MoE models.',
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, (_, help_text, examples, _) in SUBCOMMANDS.items():
        # Arguments are added in main(), for the chosen subcommand only.
        sub.add_parser(name, help=help_text, description=help_text, epilog=examples, formatter_class=HelpFormatter)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage / the error and exits
        return 2
    name = argv[0]
    module_name, help_text, examples, interrupted = SUBCOMMANDS[name]
    try:
        with ctrl_c_exits(f'foundry-dbrx {name}: interrupted while starting; nothing was written'):
            module = importlib.import_module(module_name)
        sub = argparse.ArgumentParser(prog=f'foundry-dbrx {name}', description=help_text, epilog=examples,
                                      formatter_class=HelpFormatter)
        module.add_arguments(sub)
        return int(module.run(sub.parse_args(argv[1:])) or 0)
    except KeyboardInterrupt:
        print(f'\nfoundry-dbrx {name}: interrupted; {interrupted}', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
