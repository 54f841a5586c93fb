"""Train from a YAML: ``python -m foundry_dbrx.train YAML [key=value ...]`` (also ``foundry-dbrx train`` and
``composer -n N -m foundry_dbrx.train YAML``).

A thin layer over LLM Foundry's ``train``. Before anything is built it checks what can be checked cheaply (the YAML
against LLM Foundry's schema and the model's own config parsing, ``model.training`` included, the datasets on disk,
the tokenizer against ``vocab_size``, the checkpoint that will be loaded); a problem there is one line that names the
field or file and the fix. It makes sure foundry-dbrx's registrations exist even where the package is only on
``PYTHONPATH``, adds the run-summary callback (closing lines; Ctrl-C stops at a step boundary with a checkpoint), the
divergence guard and, for the dbrx model, the ``dbrx_parallelize`` callback, then hands over.

Exit status: 0 done, 1 a training error (a diverging run ends with one line naming the step), 2 bad input found
before training, 128 + the signal's number when Ctrl-C (130) or SIGTERM (143) stopped the run.
``FOUNDRY_DBRX_DETERMINISTIC=1`` turns on PyTorch's deterministic algorithms (bit-identical GPU runs at some cost in
speed; CPU runs are deterministic without it).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import signal
import sys
import zipfile
from typing import Any, Optional, Sequence

__all__ = ['TrainInputError', 'load_config', 'checkpoint_to_load', 'start_over', 'main',
           'DETERMINISTIC_ENV']

DETERMINISTIC_ENV = 'FOUNDRY_DBRX_DETERMINISTIC'
PREFIX = '[foundry-dbrx]'
_TEXT_LOADERS = ('text', 'dbrx_text')  # loaders that read prep-data's MDS folders (local/remote/split)
_INDEX = 'index.json'


class TrainInputError(ValueError):
    """Bad input found before training (YAML, data, tokenizer, checkpoint): one line naming it and the fix."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('yaml', help='training YAML (LLM Foundry format, model.name: dbrx)')
    parser.add_argument('overrides', nargs='*', metavar='KEY=VALUE',
                        help='dotted overrides, e.g. max_duration=20ba model.n_layers=2 run_name=my-run')
    parser.add_argument('--fresh', action='store_true',
                        help='start over: delete the checkpoints autoresume would continue from (the save folder, '
                             'when it holds only checkpoints); give it before the YAML or after the overrides')


def load_config(yaml_path: str, overrides: Sequence[str] = ()):
    """The YAML with command-line overrides merged in, plus the run-summary and divergence-guard callbacks and,
    for the dbrx model, the ``dbrx_parallelize`` callback."""
    from omegaconf import OmegaConf as om
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    if not os.path.isfile(yaml_path):
        raise TrainInputError(f'training YAML {yaml_path!r} does not exist')
    try:
        cfg = om.load(yaml_path)
    except YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        raise TrainInputError(f'{yaml_path}: not valid YAML{where}: {getattr(e, "problem", None) or e}') from None
    bad = [o for o in overrides if '=' not in o]
    if bad:
        raise TrainInputError(f'overrides {bad} must look like key=value (for example max_duration=10ba)')
    try:
        if overrides:
            cfg = om.merge(cfg, om.from_dotlist(list(overrides)))
        cfg.callbacks = _with_dbrx_callbacks(cfg)
    except OmegaConfBaseException as e:
        raise TrainInputError(f'{yaml_path} with overrides {list(overrides)}: {_one_line(e)}') from None
    return cfg


def _with_dbrx_callbacks(cfg):
    from omegaconf import OmegaConf as om
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
    return callbacks


def _wants_fsdp2(cfg) -> bool:
    """Expert parallelism and replication are applied under FSDP2 (foundry_dbrx/parallelize.py)."""
    training = (cfg.get('model') or {}).get('training') or {}
    return (cfg.get('fsdp_config') is not None and (int(training.get('expert_parallel_degree', 1)) > 1
                                                    or int(training.get('data_parallel_replicate_degree', 1)) > 1))


# ---------------------------------------------------------------------------------------------------- pre-flight
def _check_files(cfg: Any, yaml_path: str) -> tuple[Optional[str], bool]:
    # Files on disk only: these come before the imports of LLM Foundry and Composer (seconds).
    resolved = _resolved(cfg, yaml_path)
    _check_datasets(resolved)
    return checkpoint_to_load(resolved)


def _check_config(cfg: Any, yaml_path: str) -> None:
    _check_schema(cfg, yaml_path)
    resolved = _resolved(cfg, yaml_path)
    _check_tokenizer(resolved, _check_model(resolved))


def _resolved(cfg: Any, yaml_path: str = 'the YAML') -> dict:
    from omegaconf import OmegaConf as om
    from omegaconf.errors import OmegaConfBaseException
    try:
        return om.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise TrainInputError(f'{yaml_path}: {_one_line(e)}') from None


def _one_line(e: BaseException) -> str:
    return ' '.join(str(e).split())


def _check_schema(cfg: Any, yaml_path: str) -> None:
    # LLM Foundry's own check (unknown top-level keys, types), the first thing its train() does; run here so that
    # its complaint is one line too.
    from llmfoundry.utils.config_utils import TRAIN_CONFIG_KEYS, TrainConfig, make_dataclass_and_log_config
    try:
        make_dataclass_and_log_config(copy.deepcopy(cfg), TrainConfig, TRAIN_CONFIG_KEYS, transforms='all')
    except (ValueError, TypeError, KeyError) as e:
        raise TrainInputError(f'{yaml_path}: not a valid LLM Foundry training config: {_one_line(e)}') from None


def _check_datasets(cfg: dict) -> None:
    """Every local-only MDS dataset a text loader will read has its index.json, else the prep-data command."""
    loaders = [('train_loader', cfg.get('train_loader'))]
    evals = cfg.get('eval_loader') or cfg.get('eval_loaders')
    if isinstance(evals, list):
        loaders += [(f'eval_loaders[{i}]', e) for i, e in enumerate(evals)]
    elif evals:
        loaders.append(('eval_loader', evals))
    seq = cfg.get('max_seq_len') or (cfg.get('model') or {}).get('max_seq_len')
    for name, loader in loaders:
        if not isinstance(loader, dict) or loader.get('name') not in _TEXT_LOADERS:
            continue
        dataset = loader.get('dataset') or {}
        streams = dataset.get('streams')
        sources = ([(f'{name}.dataset.streams.{k}', {**dataset, **(s or {})}) for k, s in streams.items()]
                   if isinstance(streams, dict) else [(f'{name}.dataset', dataset)])
        for where, source in sources:
            local, split = source.get('local'), source.get('split')
            if source.get('remote') or not local:
                continue  # streamed from a remote into the cache: Streaming reports a missing remote itself
            index = os.path.join(local, split or '', _INDEX)
            if not os.path.isfile(index):
                seq_arg = f' --max-seq-len {seq}' if seq else ''
                raise TrainInputError(
                    f'{where}.local: no dataset at {os.path.join(local, split or "")} (no {_INDEX}); make one with '
                    f'`foundry-dbrx prep-data --default --out {local}{seq_arg}` (the embedded corpus) or '
                    f'`foundry-dbrx prep-data YOUR_FILES --out {local}{seq_arg}`')


def _check_model(cfg: dict) -> Optional[int]:
    """The model section through the model's own config parsing; returns its vocab_size (dbrx models)."""
    model = cfg.get('model') or {}
    if model.get('name') != 'dbrx':
        return model.get('vocab_size')  # LLM Foundry's models check themselves
    from foundry_dbrx.composer_model import config_from_model_section
    try:
        return config_from_model_section(model)[0].vocab_size
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise TrainInputError(f'model: {_one_line(e)}') from None


def _check_tokenizer(cfg: dict, vocab_size: Optional[int]) -> None:
    tokenizer = cfg.get('tokenizer') or {}
    if tokenizer.get('name') != 'dbrx' or vocab_size is None:
        return  # other tokenizers are checked by the model's constructor, which receives them
    from foundry_dbrx.composer_model import check_tokenizer_fits
    from foundry_dbrx.data.tokenizer import DbrxTokenizer
    try:
        check_tokenizer_fits(len(DbrxTokenizer(**(tokenizer.get('kwargs') or {}))), vocab_size,
                             "tokenizer 'dbrx'")
    except ValueError as e:
        raise TrainInputError(str(e)) from None


def _save_folder(cfg: dict) -> Optional[str]:
    """The local save folder with ``{run_name}`` filled in; None when there is none, it is remote, or the run name
    is Composer's to choose."""
    folder = cfg.get('save_folder')
    run_name = cfg.get('run_name') or os.environ.get('RUN_NAME')
    if not folder or '://' in folder or ('{run_name}' in folder and not run_name):
        return None
    return folder.replace('{run_name}', run_name or '')


def _autoresume_latest(cfg: dict) -> Optional[tuple[str, str]]:
    """(the local save folder, its ``latest`` link for this rank) when ``autoresume`` is on, else None."""
    folder = _save_folder(cfg)
    run_name = cfg.get('run_name') or os.environ.get('RUN_NAME')
    if not (cfg.get('autoresume') and folder and run_name):
        return None
    sharded = (cfg.get('fsdp_config') or {}).get('state_dict_type') == 'sharded'
    latest_name = cfg.get('save_latest_filename') or ('latest-sharded-rank{rank}' if sharded else
                                                     'latest-rank{rank}.pt')
    rank = os.environ.get('RANK', '0')
    return folder, os.path.join(folder, latest_name.replace('{rank}', rank).replace('{run_name}', run_name))


def checkpoint_to_load(cfg: dict) -> tuple[Optional[str], bool]:
    """(the local checkpoint Composer will load, whether autoresume chose it), checked: with ``autoresume`` the
    ``latest`` link in the save folder when there is one, else ``load_path``. A missing or truncated file is a
    :class:`TrainInputError`."""
    found = _autoresume_latest(cfg)
    if found is not None:
        folder, latest = found
        _check_newer_checkpoints(folder, latest)
        if os.path.islink(latest) and not os.path.exists(latest):
            raise TrainInputError(f'autoresume: {latest} points to {os.readlink(latest)}, which does not exist; '
                                  'remove the link to resume from nothing, or point it at a checkpoint')
        if os.path.exists(latest):
            path = os.path.realpath(latest)
            _check_checkpoint_file(path, f'autoresume would load {path} (through {latest}), but it')
            return path, True
    load_path = cfg.get('load_path')
    if not load_path or '://' in str(load_path):
        return None, False
    load_path = str(load_path).replace('{rank}', os.environ.get('RANK', '0'))
    if not os.path.exists(load_path):
        raise TrainInputError(f'load_path: {load_path} does not exist')
    _check_checkpoint_file(load_path, f'load_path: {load_path}')
    return load_path, False


def _check_newer_checkpoints(folder: str, latest: str) -> None:
    # A process killed while saving leaves its checkpoint cut short under its final name, newer than what `latest`
    # points to; Composer would refuse the folder with a message about "conflicting files".
    if not os.path.isdir(folder):
        return
    rank = os.environ.get('RANK', '0')
    step = re.search(r'-ba(\d+)-', os.path.realpath(latest)) if os.path.exists(latest) else None
    since = int(step.group(1)) if step else -1
    for name in sorted(os.listdir(folder)):
        m = re.fullmatch(rf'ep\d+-ba(\d+)-rank{rank}\.pt', name)
        if m and int(m.group(1)) > since:
            where = f'{latest}, step {since}' if since >= 0 else 'step 0'
            _check_checkpoint_file(os.path.join(folder, name), f'{os.path.join(folder, name)} is newer than the '
                                   f'checkpoint autoresume continues from ({where}) and')


_CHECKPOINT_FILE = re.compile(r'(ep\d+-ba\d+-rank\d+\.pt|latest-rank\d+\.pt|\.node_\d+_local_rank0_completed\w*)')


def start_over(cfg: dict) -> Optional[str]:
    """``--fresh``: deletes the checkpoints that ``autoresume`` would continue from (the save folder, when it holds
    nothing but Composer checkpoints); returns what was done, for the log."""
    found = _autoresume_latest(cfg)
    if found is None:
        raise TrainInputError('--fresh deletes the checkpoints autoresume would continue from, but this config does '
                              'not resume (it needs autoresume: true, run_name and a local save_folder)')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise TrainInputError('--fresh works in a single process; with several, delete the save folder first')
    folder = found[0]
    if not os.path.isdir(folder):
        return None
    names = os.listdir(folder)
    others = [n for n in names if not _CHECKPOINT_FILE.fullmatch(n)]
    if others:
        raise TrainInputError(f'--fresh: {folder} holds files that are not Composer checkpoints ({others[:5]}); '
                              'it is left alone: move them or delete the folder yourself')
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in names if not os.path.islink(os.path.join(folder, n)))
    shutil.rmtree(folder)
    return f'--fresh: deleted the previous checkpoints of this run ({folder}, {len(names)} files, {size / 1e6:,.0f} MB)'


def _already_complete(cfg: dict, checkpoint: Optional[str]) -> Optional[str]:
    """A message when the checkpoint to load already reached ``max_duration`` (in batches), else None."""
    duration = str(cfg.get('max_duration') or '')
    step = re.search(r'-ba(\d+)-', os.path.basename(checkpoint or ''))
    if not (re.fullmatch(r'\d+ba', duration) and step) or int(step.group(1)) < int(duration[:-2]):
        return None
    return (f'nothing to train: this run is complete ({checkpoint} is at step {step.group(1)}, max_duration is '
            f'{duration}). Raise max_duration to train further (make train ARGS=\'max_duration=200ba\'), or start '
            'over with --fresh (make train FRESH=1) or another run_name')


def _check_checkpoint_file(path: str, what: str) -> None:
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, '.metadata')):
            raise TrainInputError(f'{what} is a folder without .metadata: not a sharded Composer checkpoint')
        return
    if path.endswith(('.tar', '.tar.gz', '.tgz', '.lz4', '.gz', '.zst', '.bz2', '.xz')):
        return  # compressed: Composer unpacks it; nothing cheap to check
    # torch.save writes a zip whose directory sits at the very end: a file cut short (a killed save, a full disk)
    # has none. Reading the directory costs nothing at any checkpoint size.
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        complete = any(n.endswith('/data.pkl') for n in names) and any(n.endswith('/version') for n in names)
    except (zipfile.BadZipFile, OSError) as e:
        raise TrainInputError(f'{what} is not a complete checkpoint ({_one_line(e)}; {os.path.getsize(path):,} '
                              'bytes): cut short while being written? Load an earlier checkpoint, or remove '
                              'it') from None
    if not complete:
        raise TrainInputError(f'{what} is a zip file but not a torch.save checkpoint (no data.pkl and version)')


def _missing_folders(folder: Optional[str]) -> list[str]:
    """``folder`` and those of its parents that do not exist yet, deepest first (a local, resolved path only)."""
    if not folder or '{' in folder:
        return []
    missing = []
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_empty(folders: Sequence[str]) -> None:
    for folder in folders:  # deepest first; a folder something was written into stays
        if _is_rank_zero() and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def _raised_while_loading(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == 'load_checkpoint' and 'composer' in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


# ----------------------------------------------------------------------------------------------------------- run
def _is_rank_zero() -> bool:
    return int(os.environ.get('RANK', '0')) == 0


def _error(message: str, every_rank: bool = False) -> None:
    if every_rank or _is_rank_zero():
        rank = os.environ.get('RANK')
        where = f' (rank {rank})' if every_rank and int(os.environ.get('WORLD_SIZE', '1')) > 1 else ''
        print(f'foundry-dbrx train{where}: error: {message}', file=sys.stderr, flush=True)


def _summary_callback(trainer: Any):
    from foundry_dbrx.summary import RunSummary
    return next((cb for cb in trainer.state.callbacks if isinstance(cb, RunSummary)), None)


def run(args: argparse.Namespace) -> int:
    """Checks, trains, closes; returns the exit status (see the module docstring)."""
    from foundry_dbrx.cli import ctrl_c_exits, freeze_imports

    interrupted = 'interrupted before training started: nothing was trained or written'
    try:
        cfg = load_config(args.yaml, args.overrides)
        if getattr(args, 'fresh', False):
            done = start_over(_resolved(cfg, args.yaml))
            if done:
                print(f'{PREFIX} {done}', flush=True)
        checkpoint, resuming = _check_files(cfg, args.yaml)
        with ctrl_c_exits(f'foundry-dbrx train: error: {interrupted}' if _is_rank_zero() else ''):
            # LLM Foundry, Composer and torch: seconds of imports. Composer's replaces Python's Ctrl-C handler with
            # a silent sys.exit(130); the block's end puts Python's back (KeyboardInterrupt, reported below) until
            # training starts and the run-summary callback takes Ctrl-C over.
            import llmfoundry.command_utils  # noqa: F401

            from foundry_dbrx.composer_model import ComposerDbrxCausalLM  # noqa: F401
            from foundry_dbrx.registry import register_all
        freeze_imports()
        register_all()
        _check_config(cfg, args.yaml)
        complete = _already_complete(_resolved(cfg), checkpoint)
    except TrainInputError as e:
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        _error(interrupted)
        return 130
    if complete:
        if _is_rank_zero():
            print(f'{PREFIX} {complete}', flush=True)
        return 0
    if _is_rank_zero():
        if resuming:
            print(f'{PREFIX} autoresume: continuing this run from {checkpoint} (--fresh, or make train FRESH=1 for '
                  'the tiny run, starts over)', flush=True)
        elif _autoresume_latest(_resolved(cfg)) is not None:
            folder = _autoresume_latest(_resolved(cfg))[0]
            print(f'{PREFIX} a new run; its checkpoints go to {folder}, and running the same command again '
                  'continues it from the latest one', flush=True)
    if os.environ.get(DETERMINISTIC_ENV, '') not in ('', '0'):
        # Before any CUDA work: cuBLAS reads its workspace setting when its handle is created.
        from composer.utils.reproducibility import configure_deterministic_mode
        configure_deterministic_mode()
    from llmfoundry.command_utils import train

    from foundry_dbrx.divergence import DivergenceError
    from foundry_dbrx.summary import RunInterrupted
    from foundry_dbrx.parallelize import fsdp_version
    if _wants_fsdp2(cfg) and fsdp_version() != 2:
        # Composer 0.32 picks FSDP2 from this variable when it builds the Trainer, after this point.
        os.environ['FSDP_VERSION'] = '2'
        if _is_rank_zero():
            print(f'{PREFIX} expert parallelism / replication: FSDP2 (FSDP_VERSION=2)', flush=True)
    new_folders = _missing_folders(_save_folder(_resolved(cfg)))
    try:
        trainer = train(cfg)
    except RunInterrupted:
        return 130  # a second Ctrl-C; the run's closing lines (at exit) say what was saved
    except DivergenceError as e:
        _error(str(e))
        return 1
    except KeyboardInterrupt:
        _remove_empty(new_folders)  # Composer makes the save folder when it builds the trainer
        _error(interrupted)
        return 130
    except Exception as e:
        if checkpoint is not None and _raised_while_loading(e):
            _error(f'cannot load checkpoint {checkpoint}: {type(e).__name__}: {_one_line(e)}', every_rank=True)
            return 2
        from foundry_dbrx.data.loader import ShardUnavailableError
        if isinstance(e, ShardUnavailableError):
            _error(f'{type(e).__name__}: {_one_line(e)}', every_rank=True)
            return 1
        raise
    summary = _summary_callback(trainer)
    trainer.close()  # the closing lines, after the last metrics
    if summary is not None and summary.stopped_at is not None:
        return 128 + (summary.stop_signal or signal.SIGTERM)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from foundry_dbrx.cli import SUBCOMMANDS, HelpFormatter
    parser = argparse.ArgumentParser(prog='python -m foundry_dbrx.train', description=SUBCOMMANDS['train'][1],
                                     epilog=SUBCOMMANDS['train'][2], formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
