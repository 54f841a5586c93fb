"""``foundry-dbrx convert {hf-to-composer,composer-to-hf}``. Every failure is one line on stderr, no traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from foundry_dbrx.hf.convert import DTYPES, composer_to_hf, hf_to_composer

__all__ = ['add_arguments', 'run', 'one_line']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='direction', required=True, metavar='DIRECTION')
    p = sub.add_parser('hf-to-composer', help='HF DBRX folder -> Composer checkpoint (.pt) for load_path',
                       description='HF DBRX folder -> Composer checkpoint (.pt) for load_path + load_weights_only',
                       formatter_class=parser.formatter_class,
                       epilog='example:  foundry-dbrx convert hf-to-composer ./dbrx-base ./dbrx-base.pt\n'
                              '          then in the YAML: load_path: ./dbrx-base.pt  load_weights_only: true')
    p.add_argument('hf_dir', metavar='HF_DIR', help='a local HF DBRX folder (config.json, *.safetensors)')
    p.add_argument('out', metavar='OUT', help='the .pt file to write')
    p.add_argument('--dtype', choices=sorted(DTYPES), help='cast the weights (default: keep)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace OUT if it is a checkpoint that hf-to-composer wrote (nothing else is replaced)')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    p = sub.add_parser('composer-to-hf', help='Composer checkpoint (.pt or sharded folder) -> HF DBRX folder',
                       description='Composer checkpoint (.pt or FSDP sharded folder) -> HF DBRX folder',
                       formatter_class=parser.formatter_class,
                       epilog='example:  foundry-dbrx convert composer-to-hf runs/dbrx-tiny/checkpoints/'
                              'latest-rank0.pt ./dbrx-tiny-hf --config yamls/dbrx-tiny.yaml')
    p.add_argument('ckpt', metavar='CKPT', help='a Composer checkpoint: a .pt file or a sharded checkpoint folder')
    p.add_argument('out_dir', metavar='OUT_DIR', help='the HF folder to write')
    p.add_argument('--config', help='training YAML, HF config.json or HF folder with the model config '
                                    '(not needed for checkpoints made by hf-to-composer)')
    p.add_argument('--tokenizer-dir', help='HF folder whose tokenizer / generation files to copy')
    p.add_argument('--shard-size', default='5GB', help='largest safetensors shard (default 5GB)')
    p.add_argument('--dtype', choices=sorted(DTYPES), help='cast the weights (default: keep)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace OUT_DIR if it is an HF export that foundry-dbrx wrote and holds nothing else')
    p.add_argument('--trust-checkpoint-code', action='store_true',
                   help='unpickle CKPT in full, which RUNS ANY CODE THE FILE CONTAINS; only for checkpoints you made '
                        'or trust. Without it only the types Composer checkpoints contain are allowed')
    p.add_argument('--quiet', action='store_true', help='no progress bar')


def one_line(message: str) -> str:
    """A multi-line error message (a key mismatch lists its kinds of problem on separate lines) as one line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return 'unknown error'
    head, rest = lines[0], lines[1:]
    return head + (' ' if head.endswith(':') else '; ') + '; '.join(rest) if rest else head


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f'{error.filename}: {error.strerror or error}'
    if isinstance(error, (ValueError, OSError)):
        return str(error)
    return f'{type(error).__name__}: {error}'


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.direction == 'hf-to-composer':
            out = hf_to_composer(args.hf_dir, args.out, dtype=dtype, overwrite=args.overwrite,
                                 progress=not args.quiet)
            print(f'Composer checkpoint: {out}\n  start a run from it with  load_path: {out}  and  '
                  'load_weights_only: true')
        else:
            out = composer_to_hf(args.ckpt, args.out_dir, config=args.config, shard_size=args.shard_size,
                                 dtype=dtype, tokenizer_dir=args.tokenizer_dir, overwrite=args.overwrite,
                                 progress=not args.quiet, trust_code=args.trust_checkpoint_code)
            print(f'HF DBRX folder: {out}\n  load it with  transformers.DbrxForCausalLM.from_pretrained({str(out)!r})')
    except Exception as e:  # every failure: one line naming the file, no traceback
        print(f'foundry-dbrx convert: error: {one_line(_describe(e))}', file=sys.stderr)
        return 1
    return 0
