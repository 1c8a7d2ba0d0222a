"""The README's first command end to end (slow: about 10 minutes on 2 cores): `pertscale
quickstart` on a fresh storage root runs every step of the mission, shows one progress display
for the whole pipeline, ends with the evaluation tables, the registered models with their
lineage and the MLflow UI command, registers every model family with lineage tags in experiments
the MLflow UI opens as model training, and predicts an unseen combination."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pertscale.pipeline import STEPS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "storage" / "screenshots"  # kept as CI artifacts


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    storage = tmp_path_factory.mktemp("quickstart")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "pertscale", "quickstart"], cwd=REPO,
                          env={**env, "PERTSCALE_STORAGE": str(storage)}, capture_output=True,
                          text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # NOTE: the training progress bars (tqdm) write to stderr
    return proc.stdout + proc.stderr, storage


def _client(storage: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{storage / 'mlflow' / 'mlflow.db'}")


def test_every_step_runs_under_one_progress_display_and_the_summary_ends_it(quickstart):
    out, _ = quickstart
    headers = re.findall(r"=== \[quickstart (\d+)/(\d+) (\w+) \| (\d\d):(\d\d) elapsed\]", out)
    assert [h[2] for h in headers] == list(STEPS)
    assert [int(h[0]) for h in headers] == list(range(1, len(STEPS) + 1))
    assert {int(h[1]) for h in headers} == {len(STEPS)}
    clock = [int(m) * 60 + int(s) for *_, m, s in headers]
    assert clock == sorted(clock)
    # each training step's own bar carries the pipeline's stage and elapsed time
    for k, step in enumerate(STEPS, 1):
        if step.startswith(("pretrain", "finetune")):
            assert re.search(rf"\[quickstart {k}/{len(STEPS)} {step} \| \d\d:\d\d\]: +\d+%",
                             out), step
    summary = out[out.rindex("quickstart summary"):]
    for step in STEPS:
        assert re.search(rf"^\s+{step}\s+[\d.]+\s+ok$", summary, re.MULTILINE), step
    evaluation = summary[summary.index("evaluation (GEARS simulation split"):]
    for model in ("gears@quickstart", "scgpt_perturb@quickstart", "genepert@table",
                  "genepert@scgpt_genes", "train_mean", "additive"):
        assert re.search(rf"^\s+{re.escape(model)}\s+(-?\d|n/a)", evaluation, re.MULTILINE), model
    assert re.search(r"^\s+scgen@quickstart\s+\d\.\d{3} / \d\.\d{3}$", evaluation, re.MULTILINE)
    assert "registered models (lineage" in summary
    assert re.search(r"mlflow ui --backend-store-uri sqlite:///\S+mlflow\.db", summary)


def test_the_registry_holds_every_model_family_with_its_lineage(quickstart):
    out, storage = quickstart
    client = _client(storage)

    def version(name: str, alias: str):
        return client.get_model_version_by_alias(f"pertscale-{name}", alias)

    scgpt, pathway_vae = version("scgpt", "quickstart"), version("pathway_vae", "quickstart")
    children = {"gears": (version("gears", "quickstart"), scgpt),
                "scgpt_perturb": (version("scgpt_perturb", "quickstart"), scgpt),
                "genepert@scgpt_genes": (version("genepert", "scgpt_genes"), scgpt),
                "scgen": (version("scgen", "quickstart"), pathway_vae)}
    for name, (child, parent) in children.items():
        want = f"models:/{parent.name}/{parent.version}"
        assert child.tags["init_from_version"] == want, name
        assert re.search(rf"models:/{child.name}/{child.version}\s.*parent {re.escape(want)}",
                         out), name
    table = version("genepert", "table")
    assert table.tags["features"].endswith("gene_embeddings.npz")
    fingerprints = {v.tags["store_fingerprint"] for v in
                    (scgpt, pathway_vae, table, *(c for c, _ in children.values()))}
    assert len(fingerprints) == 1
    # the MLflow UI opens these experiments as model training, not GenAI apps
    for exp in client.search_experiments():
        if exp.name.startswith("pertscale"):
            assert exp.tags.get("mlflow.experimentKind") == "custom_model_development", exp.name


def test_an_unseen_combination_is_predicted(quickstart):
    import anndata as ad
    import numpy as np

    _, storage = quickstart
    predicted = ad.read_h5ad(storage / "quickstart" / "predicted.h5ad")
    labels = set(predicted.obs["perturbation"].astype(str))
    assert len(labels) == 1
    combo = labels.pop()
    genes = combo.split("+")
    assert len(genes) == 2
    split = json.loads(next((storage / "reports").glob("quickstart-2*/split.json")).read_text())
    trained = {c.split("/", 1)[1] for c in split["train"]}
    assert not any(g in trained for g in genes)  # neither gene perturbed in training
    assert sorted(predicted.obs["cell_type"].astype(str)) == ["cell_type_1", "cell_type_2",
                                                              "cell_type_3"]
    assert predicted.n_vars == 500 and np.isfinite(predicted.X).all()


def _chromium(*args: str) -> subprocess.CompletedProcess:
    """Debian's headless chromium; charts are drawn within its virtual time budget."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--window-size=1600,1000",
                           "--run-all-compositor-stages-before-draw",
                           "--virtual-time-budget=60000", *args],
                          capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def mlflow_ui(quickstart, start_server, free_port):
    """`mlflow server` on the quickstart's database (the UI it prints the command for)."""
    _, storage = quickstart
    url = f"http://127.0.0.1:{free_port()}"
    start_server([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                  f"sqlite:///{storage / 'mlflow' / 'mlflow.db'}", "--host", "127.0.0.1",
                  "--port", url.rsplit(":", 1)[1], "--workers", "1"], url, "mlflow server")
    return url


def test_the_mlflow_ui_shows_the_registered_models_and_the_metric_charts(quickstart, mlflow_ui):
    _, storage = quickstart
    SHOTS.mkdir(parents=True, exist_ok=True)
    mode = "?workflowType=machine_learning"  # the UI's model-training view
    models = f"{mlflow_ui}/#/models{mode}"
    page = _chromium("--dump-dom", models).stdout
    for name in ("scgpt", "pathway_vae", "gears", "scgpt_perturb", "scgen", "genepert"):
        assert f">pertscale-{name}<" in page, name
    version = _client(storage).get_model_version_by_alias("pertscale-scgpt", "quickstart")
    run = _client(storage).get_run(version.run_id)
    charts = (f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
              f"/model-metrics{mode}")
    page = _chromium("--dump-dom", charts).stdout
    for metric in ("loss", "lr", "cells_per_s"):
        assert f">{metric}<" in page, metric
    assert page.count("<svg") > 10  # the charts were drawn, not still loading
    for url, name in ((models, "mlflow_models.png"), (charts, "mlflow_scgpt_metrics.png")):
        (SHOTS / name).unlink(missing_ok=True)
        _chromium(f"--screenshot={SHOTS / name}", url)
        assert (SHOTS / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
