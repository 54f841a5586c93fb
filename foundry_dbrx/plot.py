"""``foundry-dbrx plot RUN``: PNGs of a run's losses and of its routers' health, from what it logged to MLflow.

RUN is the MLflow run name (Composer's run name) or the run id, in the store ``--tracking-uri`` (default:
``MLFLOW_TRACKING_URI``, else ``./mlruns``, where the shipped YAMLs log). Three files go to ``--out`` (default
``runs/<run name>/plots``):

- ``losses.png``: the training loss and its parts, per step: total, cross entropy, load balancing (a dashed line at
  the value of perfectly balanced routing) and router z-loss.
- ``expert_load.png``: each expert's share of the routed slots relative to the fair 1/E, on a log scale (white:
  balanced, red: overloaded, blue: underused, black: no token), for every layer over the logged steps (left) and
  as layers x experts at the last logged step (right). A healthy router is a pale picture; a stripe is an expert
  that hogs or starves across steps.
- ``router_health.png``: per layer over steps: coefficient of variation of the shares, the busiest expert's load
  relative to fair, router entropy against its maximum log E, experts without tokens (and the balancing bias's
  range when bias balancing is on).

The expert metrics come from the ``dbrx_expert_load`` callback; Composer's MLflow logger leaves out a value that
repeats the previous one, so each series is carried forward over the logged steps.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Optional

__all__ = ['add_arguments', 'run', 'plot_run', 'RunMetrics', 'load_run']

_EXPERT_KEY = re.compile(r'moe/layer_(\d+)/share_expert_(\d+)')
_LAYER_KEY = re.compile(r'moe/layer_(\d+)/(\w+)')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('run', metavar='RUN', help='MLflow run name (the Composer run name) or run id')
    parser.add_argument('--tracking-uri', help='MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlruns)')
    parser.add_argument('--out', help='folder for the PNGs (default: runs/<run name>/plots)')


class RunMetrics:
    """One MLflow run's metric histories: key -> (steps, values), and its parameters."""

    def __init__(self, name: str, run_id: str, params: dict, histories: dict[str, tuple[list, list]]):
        self.name, self.run_id, self.params, self.histories = name, run_id, params, histories

    def series(self, key: str) -> tuple[list, list]:
        return self.histories.get(key, ([], []))

    def moe_steps(self) -> list[int]:
        """Every step at which the expert-load callback logged (the union over its keys: repeats are left out)."""
        return sorted({s for k, (steps, _) in self.histories.items() if k.startswith('moe/') for s in steps})

    def on_steps(self, key: str, steps: list[int]) -> list[float]:
        """``key``'s values at ``steps``, each missing one carried forward from the last logged (NaN before it)."""
        logged = dict(zip(*self.series(key)))
        out, last = [], math.nan
        for s in steps:
            last = logged.get(s, last)
            out.append(last)
        return out


def load_run(run: str, tracking_uri: Optional[str] = None) -> RunMetrics:
    """Reads RUN's metrics from the MLflow store; ValueError naming the store and the runs it holds if not there."""
    from mlflow.tracking import MlflowClient

    from foundry_dbrx.expert_load import default_tracking_uri, display_tracking_uri
    uri = tracking_uri or default_tracking_uri()
    shown = display_tracking_uri(uri)
    if '://' not in uri and not uri.startswith('file:') and not os.path.isdir(shown):
        raise ValueError(f'no MLflow store at {shown} (--tracking-uri): train with the mlflow logger first '
                         '(the shipped YAMLs write ./mlruns)')
    client = MlflowClient(uri)
    found = None
    if re.fullmatch(r'[0-9a-f]{32}', run):
        try:
            found = client.get_run(run)
        except Exception:  # mlflow raises its own MlflowException for an unknown id: try it as a name
            found = None
    if found is None:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=f"attributes.run_name = '{run}'",
                                  order_by=['attributes.start_time DESC']) if experiments else []
        if not runs:
            recent = client.search_runs(experiments, order_by=['attributes.start_time DESC'],
                                        max_results=5) if experiments else []
            names = ', '.join(r.info.run_name for r in recent) or 'none'
            raise ValueError(f'no run named {run!r} in the MLflow store {shown}; latest runs there: {names}')
        if len(runs) > 1:
            print(f'foundry-dbrx plot: {len(runs)} runs named {run!r}; plotting the latest ({runs[0].info.run_id})',
                  file=sys.stderr)
        found = runs[0]
    histories = {}
    for key in found.data.metrics:
        points = sorted(client.get_metric_history(found.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        histories[key] = ([m.step for m in points], [m.value for m in points])
    return RunMetrics(found.info.run_name, found.info.run_id, dict(found.data.params), histories)


def plot_run(metrics: RunMetrics, out_dir: Path) -> list[Path]:
    """Writes the PNGs of the module docstring into ``out_dir``; returns their paths."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_plot_losses(metrics, out_dir / 'losses.png')]
    if not metrics.moe_steps():
        raise ValueError(f'run {metrics.name} logged no moe/ metrics: add the dbrx_expert_load callback to its YAML '
                         f'(the loss curves are in {written[0]})')
    written.append(_plot_expert_load(metrics, out_dir / 'expert_load.png'))
    written.append(_plot_router_health(metrics, out_dir / 'router_health.png'))
    return written


def _int_param(metrics: RunMetrics, name: str) -> Optional[int]:
    value = metrics.params.get(f'moe/{name}')
    return int(value) if value not in (None, '') else None


def _plot_losses(metrics: RunMetrics, path: Path) -> Path:
    import matplotlib.pyplot as plt
    lb_keys = sorted(k for k in metrics.histories if k.startswith('loss/train/lb_loss_'))
    lb_type = lb_keys[0].rsplit('lb_loss_', 1)[1] if lb_keys else None
    balanced = {'megablocks': 1.0, 'switch': _int_param(metrics, 'top_k')}.get(lb_type)
    panels = [('loss/train/total', 'total loss', None), ('loss/train/ce', 'cross entropy', None),
              (lb_keys[0] if lb_keys else None, f'load balancing ({lb_type or "not logged"})', balanced),
              ('loss/train/z_loss', 'router z-loss', None)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (key, title, reference) in zip(axes.flat, panels):
        steps, values = metrics.series(key) if key else ([], [])
        if steps:
            ax.plot(steps, values, color='tab:blue', lw=1.2)
            ax.annotate(f'{values[-1]:.4g}', (steps[-1], values[-1]), textcoords='offset points', xytext=(-4, 6),
                        ha='right', fontsize=9)
        else:
            ax.text(0.5, 0.5, 'not logged', ha='center', va='center', transform=ax.transAxes, color='gray')
        if reference is not None:
            ax.axhline(reference, color='gray', ls='--', lw=1, label='balanced routing')
            ax.legend(loc='upper right', fontsize=8)
        ax.set_title(title)
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
    fig.suptitle(f'{metrics.name}: training loss')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _expert_grid(metrics: RunMetrics, steps: list[int]):
    """shares [L, E, steps] (NaN where never logged) from the per-expert keys."""
    import numpy as np
    cells = {}
    for key in metrics.histories:
        m = _EXPERT_KEY.fullmatch(key)
        if m:
            cells[int(m.group(1)), int(m.group(2))] = key
    if not cells:
        raise ValueError(f'run {metrics.name} logged no per-expert shares (moe/layer_*/share_expert_*): set '
                         'per_layer: true on the dbrx_expert_load callback')
    num_layers = max(layer for layer, _ in cells) + 1
    num_experts = max(expert for _, expert in cells) + 1
    grid = np.full((num_layers, num_experts, len(steps)), np.nan)
    for (layer, expert), key in cells.items():
        grid[layer, expert] = metrics.on_steps(key, steps)
    return grid


def _relative_load(shares, num_experts: int):
    """log2 of share x E (0: the fair share), masked where the expert got nothing (drawn black)."""
    import numpy as np
    with np.errstate(divide='ignore', invalid='ignore'):
        rel = np.log2(shares * num_experts)
    return np.ma.masked_invalid(np.where(shares == 0, np.nan, rel)), shares == 0


def _plot_expert_load(metrics: RunMetrics, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import Normalize
    steps = metrics.moe_steps()
    grid = _expert_grid(metrics, steps)
    num_layers, num_experts, _ = grid.shape
    cmap = plt.get_cmap('RdBu_r').with_extremes(bad='black')
    norm = Normalize(vmin=-3, vmax=3)  # 1/8x .. 8x the fair share

    height = min(4 + 0.22 * num_layers * num_experts / 4, 30)
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, height), constrained_layout=True,
                                      gridspec_kw={'width_ratios': [3, 2]})
    stacked = grid.reshape(num_layers * num_experts, len(steps))
    rel, _ = _relative_load(stacked, num_experts)
    image = left.imshow(rel, aspect='auto', interpolation='nearest', cmap=cmap, norm=norm,
                        extent=(-0.5, len(steps) - 0.5, num_layers * num_experts - 0.5, -0.5))
    for layer in range(1, num_layers):
        left.axhline(layer * num_experts - 0.5, color='white', lw=1.5)
    left.set_yticks([layer * num_experts + (num_experts - 1) / 2 for layer in range(num_layers)])
    left.set_yticklabels([f'layer {layer}' for layer in range(num_layers)])
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int))
    left.set_xticks(ticks)
    left.set_xticklabels([str(steps[i]) for i in ticks])
    left.set_xlabel('step')
    left.set_title(f'each layer\'s {num_experts} experts (rows, expert 0 on top) over the logged steps')

    last, dead = _relative_load(grid[:, :, -1], num_experts)
    right.imshow(last, aspect='auto', interpolation='nearest', cmap=cmap, norm=norm)
    right.set_xlabel('expert')
    right.set_ylabel('layer')
    right.set_yticks(range(num_layers))
    right.set_xticks(range(0, num_experts, max(1, num_experts // 16)))
    right.set_title(f'layers x experts at step {steps[-1]}')
    if num_layers * num_experts <= 256:
        for layer in range(num_layers):
            for expert in range(num_experts):
                share = grid[layer, expert, -1]
                label = '0' if dead[layer, expert] else f'{share * num_experts:.2g}'
                right.text(expert, layer, label, ha='center', va='center', fontsize=7,
                           color='white' if dead[layer, expert] or abs(last[layer, expert]) > 2 else 'black')

    bar = fig.colorbar(image, ax=[left, right], shrink=min(0.8, 6 / height), pad=0.01)
    bar.set_ticks([-3, -2, -1, 0, 1, 2, 3])
    bar.set_ticklabels(['1/8', '1/4', '1/2', '1 (fair)', '2', '4', '8'])
    bar.set_label('share of routed slots / fair share 1/E   (black: no token)')
    worst = np.nanmax(grid[:, :, -1]) * num_experts
    fig.suptitle(f'{metrics.name}: expert load. At step {steps[-1]}: busiest expert {worst:.2f}x its fair share, '
                 f'{int(dead.sum())} of {num_layers * num_experts} layer-experts without a token')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layer_series(metrics: RunMetrics, name: str, steps: list[int]) -> dict[int, list[float]]:
    out = {}
    for key in metrics.histories:
        m = _LAYER_KEY.fullmatch(key)
        if m and m.group(2) == name:
            out[int(m.group(1))] = metrics.on_steps(key, steps)
    return dict(sorted(out.items()))


def _layer_color(i: int, n: int):
    import matplotlib.pyplot as plt
    if n <= 10:
        return plt.get_cmap('tab10')(i)
    return plt.get_cmap('viridis')(0.9 * i / (n - 1))  # stop short of viridis' pale yellow end


def _plot_router_health(metrics: RunMetrics, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np
    steps = metrics.moe_steps()
    num_experts = _int_param(metrics, 'num_experts') or _expert_grid(metrics, steps).shape[1]
    has_bias = any(k.endswith('bias_range') for k in metrics.histories)
    panels = [
        ('expert_share_cv', 'coefficient of variation of the expert shares', 1.0, None),
        ('expert_share_max', 'busiest expert, x its fair share', num_experts, 1.0),
        ('router_entropy', f'router entropy, nats (dashed: the maximum, ln {num_experts})', 1.0,
         math.log(num_experts)),
        ('dead_experts', 'experts without a token', 1.0, None),
    ]
    if has_bias:
        panels.append(('bias_range', 'balancing bias: max - min', 1.0, None))
    cols = 3 if has_bias else 2
    fig, axes = plt.subplots(2, cols, figsize=(6 * cols, 7.5), constrained_layout=True)
    overall_label = {'expert_share_max': 'all layers (max)', 'dead_experts': 'all layers (sum)',
                     'bias_range': 'all layers (max)'}
    for ax, (name, title, scale, reference) in zip(axes.flat, panels):
        layers = _layer_series(metrics, name, steps)
        for i, (layer, values) in enumerate(layers.items()):
            ax.plot(steps, np.asarray(values) * scale, lw=1, alpha=0.85, color=_layer_color(i, len(layers)),
                    label=f'layer {layer}' if len(layers) <= 10 else None)
        overall = metrics.on_steps(f'moe/{name}', steps)
        ax.plot(steps, np.asarray(overall) * scale, color='black', lw=2, ls=':' if layers else '-',
                label=overall_label.get(name, 'all layers (mean)'))
        if reference is not None:
            ax.axhline(reference, color='gray', ls='--', lw=1)
        ax.set_title(title)
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
        if name in ('expert_share_cv', 'dead_experts', 'bias_range'):
            ax.set_ylim(bottom=0)
        if name == 'router_entropy':  # the whole range: a collapsing router shows as a fall from the top line
            ax.set_ylim(0, 1.05 * math.log(num_experts))
        if name == 'dead_experts':
            ax.yaxis.get_major_locator().set_params(integer=True)
    axes.flat[0].legend(fontsize=8, loc='upper right')
    for ax in list(axes.flat)[len(panels):]:
        ax.axis('off')
    cv, biggest, dead = (metrics.on_steps(f'moe/{name}', steps)[-1]
                         for name in ('expert_share_cv', 'expert_share_max', 'dead_experts'))
    fig.suptitle(f'{metrics.name}: router health per layer. At step {steps[-1]}: cv {cv:.3f} (balanced: 0), busiest '
                 f'expert {biggest * num_experts:.2f}x fair (balanced: 1), {int(dead)} layer-experts without a token')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    try:
        metrics = load_run(args.run, args.tracking_uri)
        out = Path(args.out) if args.out else Path('runs') / metrics.name / 'plots'
        written = plot_run(metrics, out)
    except (ValueError, OSError) as e:
        print(f'foundry-dbrx plot: error: {e}', file=sys.stderr)
        return 1
    for path in written:
        print(f'[foundry-dbrx] wrote {path.resolve()}')
    return 0
