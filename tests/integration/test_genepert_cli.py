"""`pertscale fit genepert` and `pertscale evaluate` end to end: a simulated screen in a real
store, GenePert's CV folds as Ray tasks on a local cluster, the report, MLflow and the registry;
and the same report on the real Norman 2019 subset, ingested into a store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pertscale.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
NORMAN = REPO.parent / "shared/data/perturbseq/norman2019_mcfaline2023_devel.h5ad"
NORMAN_EMB = REPO.parent / "shared/data/gene_emb/minilm_orghs_text_demo.npz"


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    from pertscale.data.synthetic import SimulatorConfig, write_dataset

    out = tmp_path_factory.mktemp("screen")
    cfg = SimulatorConfig(n_genes=300, n_cells=6000, n_cell_types=2, n_batches=1,
                          n_single_perturbations=50, n_double_perturbations=20, seed=3)
    write_dataset(cfg, out / "files", store_uri=str(out / "store"))
    return out / "store", out / "files" / "gene_embeddings.npz"


def _png_ok(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[0] > 100


def test_fit_then_evaluate(ray_session, screen, storage_dir, tmp_path, capsys):
    import mlflow

    from pertscale.paths import default_tracking_uri
    from pertscale.tracking import pull_model

    store, emb = screen
    args = [f"--data.store_uri={store}", f"--embeddings.path={emb}"]
    assert main(["fit", "genepert", "--config", str(REPO / "configs/genepert.toml"), *args,
                 f"--report.out_dir={tmp_path / 'fit'}"]) == 0
    printed = capsys.readouterr().out
    assert "| unseen_single | genepert |" in printed and "models:/pertscale-genepert/1" in printed

    fit = pd.read_csv(tmp_path / "fit" / "metrics.csv")
    models = set(fit["model"])
    assert models == {"genepert", "no_change", "train_mean", "additive", "linear"}
    single = fit[fit["subgroup"] == "unseen_single"].set_index("model")
    assert single.at["genepert", "pearson_delta_de"] > single.at["train_mean", "pearson_delta_de"]
    assert single.at["genepert", "mse_de"] < single.at["train_mean", "mse_de"]
    report = (tmp_path / "fit" / "report.md").read_text()
    assert "| combo_seen2 | additive |" in report and "alpha" in report
    for png in (tmp_path / "fit" / "plots").glob("*.png"):
        _png_ok(png)
    assert {p.name for p in (tmp_path / "fit" / "plots").glob("*.png")} >= {
        "de_unseen_single.png", "bars_pearson_delta_de.png", "bars_mse_de.png"}

    # MLflow: params, per-split metrics, the report folder, the registered weights
    client = mlflow.MlflowClient(default_tracking_uri())
    run = client.search_runs(client.get_experiment_by_name("pertscale-genepert").experiment_id)[0]
    assert run.data.params["genepert.n_folds"] == "5"
    assert {f"genepert_cv/mse_alpha_{a:g}" for a in (0.01, 0.1, 1, 10, 100)} <= set(run.data.metrics)
    assert float(run.data.params["genepert.chosen_alpha"]) in (0.01, 0.1, 1.0, 10.0, 100.0)
    assert run.data.metrics["unseen_single/genepert/pearson_delta_de"] == pytest.approx(
        single.at["genepert", "pearson_delta_de"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert "report/report.md" in artifacts and "report/plots" in artifacts
    pulled = pull_model("models:/pertscale-genepert@latest")
    assert pulled.config["model"] == "genepert" and pulled.state_dict["coef"].shape[1] == 300

    # evaluate pulls that model: the same split gives the same GenePert numbers
    assert main(["evaluate", "--config", str(REPO / "configs/evaluate.toml"),
                 f"--data.store_uri={store}", f"--report.out_dir={tmp_path / 'eval'}"]) == 0
    again = pd.read_csv(tmp_path / "eval" / "metrics.csv")
    cols = ["subgroup", "model", "n", "pearson_delta", "mse_de"]
    left = fit[fit["model"] == "genepert"][cols].reset_index(drop=True)
    right = again[again["model"] == "genepert"][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(left, right, rtol=1e-9)


def test_user_errors(ray_session, screen, storage_dir, tmp_path, capsys):
    store, emb = screen
    with np.load(emb) as z:
        np.savez(tmp_path / "few.npz", genes=z["genes"][:5], emb=z["emb"][:5])
    config = str(REPO / "configs/genepert.toml")
    assert main(["fit", "genepert", "--config", config, f"--data.store_uri={store}",
                 f"--embeddings.path={tmp_path / 'few.npz'}"]) == 1
    assert "perturbed gene(s) have no embedding: ['G0" in capsys.readouterr().err
    assert main(["fit", "genepert", "--config", config, f"--embeddings.path={emb}"]) == 2
    assert "data.store_uri is empty" in capsys.readouterr().err
    assert main(["fit", "genepert", "--config", config, "--genepert.alphas=[]"]) == 2
    assert main(["fit", "scgpt", "--config", config]) == 1
    assert "unknown model 'scgpt'" in capsys.readouterr().err


def test_norman_report_from_ingested_store(ray_session, storage_dir, tmp_path):
    if not NORMAN.is_file() or not NORMAN_EMB.is_file():
        pytest.skip(f"real data {NORMAN} / {NORMAN_EMB} is absent")
    store = tmp_path / "norman"
    assert main(["ingest", str(NORMAN), "--out", str(store), "--values", "normalised",
                 "--quiet"]) == 0
    assert main(["fit", "genepert", "--config", str(REPO / "configs/genepert_norman.toml"),
                 f"--data.store_uri={store}", f"--embeddings.path={NORMAN_EMB}",
                 f"--report.out_dir={tmp_path / 'rep'}"]) == 0
    metrics = pd.read_csv(tmp_path / "rep" / "metrics.csv")
    assert {"unseen_single", "combo_seen2"} <= set(metrics["subgroup"])
    assert set(metrics["model"]) == {"genepert", "no_change", "train_mean", "additive", "linear"}
    # 33 norman19 perturbations, none of mcfaline23's
    sizes = metrics.drop_duplicates("subgroup").set_index("subgroup")
    assert np.isfinite(metrics[metrics["model"] == "genepert"]["pearson_delta"]).all()
    assert "norman19" not in (tmp_path / "rep" / "per_condition.csv").read_text()
    assert len(sizes) >= 3
