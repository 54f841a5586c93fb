"""Tracking end to end: a short real run of the shipped tiny YAML (LLM Foundry's train, the embedded corpus) logs
to a local MLflow store, which then holds its loss and expert-load metrics; the run ends by printing where the
store is; ``foundry-dbrx plot`` draws non-empty PNGs from that store."""

from __future__ import annotations

import pytest

from tests.test_training import _train, corpus  # noqa: F401  (corpus is a fixture)

STEPS = 12


@pytest.fixture(scope='module')
def tracked_run(corpus, tmp_path_factory):  # noqa: F811
    import contextlib
    import io

    folder = tmp_path_factory.mktemp('tracked')
    store = folder / 'mlruns'
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _train(corpus, folder, f'max_duration={STEPS}ba', 'run_name=tracked-tiny', 'save_folder=null', 'autoresume=false',
               'callbacks.dbrx_expert_load.log_interval=3ba', 'model.training.moe_z_loss_weight=0.001')
    return store, printed.getvalue()


def test_mlflow_store_holds_the_run_metrics(tracked_run):
    from mlflow.tracking import MlflowClient

    store, printed = tracked_run
    # The run ends by saying where its metrics are and how to see them.
    assert f'[foundry-dbrx] MLflow run tracked-tiny (id ' in printed and f'in {store}' in printed
    assert f'mlflow ui --backend-store-uri {store}' in printed
    assert f'router plots:  foundry-dbrx plot tracked-tiny --tracking-uri {store}\n' in printed
    client = MlflowClient(str(store))
    (experiment,) = [e for e in client.search_experiments() if e.name == 'foundry-dbrx']
    (run,) = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'tracked-tiny'")
    metrics = run.data.metrics
    for key in ('loss/train/total', 'loss/train/ce', 'loss/train/lb_loss_megablocks', 'loss/train/z_loss',
                'moe/expert_share_cv', 'moe/router_entropy', 'moe/z_loss', 'moe/layer_1/share_expert_15'):
        assert key in metrics, (key, sorted(metrics)[:20])
    assert len(client.get_metric_history(run.info.run_id, 'loss/train/total')) == STEPS
    steps = {m.step for m in client.get_metric_history(run.info.run_id, 'moe/router_entropy')}
    assert steps == {3, 6, 9, 12}
    assert run.data.params['moe/num_experts'] == '16' and run.data.params['moe/lb_loss_type'] == 'megablocks'


def test_plot_writes_pngs_from_the_store(tracked_run, tmp_path, capsys):
    from PIL import Image

    from foundry_dbrx.cli import main

    store, _ = tracked_run
    out = tmp_path / 'plots'
    assert main(['plot', 'tracked-tiny', '--tracking-uri', str(store), '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ('losses.png', 'expert_load.png', 'router_health.png'):
        path = out / name
        assert path.stat().st_size > 20_000 and str(path.resolve()) in printed
        with Image.open(path) as image:
            assert image.width > 800 and image.height > 500
            assert len(image.convert('L').getcolors(maxcolors=1 << 20)) > 50  # drawn, not blank

    assert main(['plot', 'no-such-run', '--tracking-uri', str(store)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("foundry-dbrx plot: error: no run named 'no-such-run'") and 'tracked-tiny' in err
    assert '\n' not in err
    assert main(['plot', 'tracked-tiny', '--tracking-uri', str(tmp_path / 'nothing')]) == 1
    assert 'no MLflow store at' in capsys.readouterr().err
