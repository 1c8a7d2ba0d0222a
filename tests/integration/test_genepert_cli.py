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
    assert models == {"genepert", "no_change", "train_mean", "additive", "matching_mean", "linear"}
    # every family's metrics, and each normalised against the train mean
    assert {"mse_de", "mae", "discrimination_score_l1", "overlap_at_n", "pearson_delta_pert",
            "centroid_accuracy", "norm_mae", "vcc_score"} <= set(fit.columns)
    assert (fit.loc[fit["model"] == "train_mean", "norm_mae"] == 0).all()
    for family in ("gears", "cell-eval", "systema"):
        assert f"### {family} metrics" in printed
    single = fit[fit["subgroup"] == "unseen_single"].set_index("model")
    assert single.at["genepert", "pearson_delta_de"] > single.at["train_mean", "pearson_delta_de"]
    assert single.at["genepert", "mse_de"] < single.at["train_mean", "mse_de"]
    report = (tmp_path / "fit" / "report.md").read_text()
    assert "| combo_seen2 | additive |" in report and "alpha" in report
    for png in (tmp_path / "fit" / "plots").glob("*.png"):
        _png_ok(png)
    assert {p.name for p in (tmp_path / "fit" / "plots").glob("*.png")} >= {
        "de_unseen_single.png", "metrics_gears.png", "metrics_cell-eval.png",
        "metrics_systema.png"}

    # MLflow: params, per-split metrics, the report folder, the registered weights
    client = mlflow.MlflowClient(default_tracking_uri())
    run = client.search_runs(client.get_experiment_by_name("pertscale-genepert").experiment_id)[0]
    assert run.data.params["model.n_folds"] == "5"
    assert {f"genepert_cv/mse_alpha_{a:g}" for a in (0.01, 0.1, 1, 10, 100)} <= set(run.data.metrics)
    assert float(run.data.params["genepert.alpha"]) in (0.01, 0.1, 1.0, 10.0, 100.0)
    assert run.data.metrics["unseen_single/genepert/pearson_delta_de"] == pytest.approx(
        single.at["genepert", "pearson_delta_de"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.md", "report/plots", "report/per_condition.csv",
            "report/split.json"} <= artifacts
    assert run.data.metrics["unseen_single/genepert/overlap_at_n"] == pytest.approx(
        single.at["genepert", "overlap_at_n"])
    pulled = pull_model("models:/pertscale-genepert@latest")
    assert pulled.config["model"] == "genepert" and pulled.state_dict["coef"].shape[1] == 300

    # evaluate pulls that model: the same split gives the same GenePert numbers
    assert main(["evaluate", "--config", str(REPO / "configs/evaluate.toml"),
                 f"--data.store_uri={store}", f"--report.out_dir={tmp_path / 'eval'}"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "Downloading artifacts" not in captured.out + captured.err  # MLflow's progress bars
    for family in ("gears", "cell-eval", "systema"):
        assert f"### {family} metrics" in printed
    assert "| unseen_single | matching_mean |" in printed and "VCC score" in printed
    evaluated = client.search_runs(
        client.get_experiment_by_name("pertscale-evaluate").experiment_id)[0]
    assert {"report/per_condition.csv", "report/split.json"} <= {
        a.path for a in client.list_artifacts(evaluated.info.run_id, "report")}
    again = pd.read_csv(tmp_path / "eval" / "metrics.csv")
    cols = ["subgroup", "model", "n", "pearson_delta", "mse_de", "mae", "overlap_at_n",
            "centroid_accuracy"]
    left = fit[fit["model"] == "genepert"][cols].reset_index(drop=True)
    right = again[again["model"] == "genepert"][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(left, right, rtol=1e-9)

    # the baselines alone, no model
    assert main(["evaluate", "--config", str(REPO / "configs/evaluate.toml"),
                 f"--data.store_uri={store}", "--models=[]", "--baselines_only=true",
                 f"--report.out_dir={tmp_path / 'base'}"]) == 0
    alone = pd.read_csv(tmp_path / "base" / "metrics.csv")
    assert set(alone["model"]) == {"no_change", "train_mean", "additive", "matching_mean",
                                   "linear"}
    # one family on request
    capsys.readouterr()
    assert main(["evaluate", "--config", str(REPO / "configs/evaluate.toml"),
                 f"--data.store_uri={store}", "--metrics", "systema",
                 f"--report.out_dir={tmp_path / 'systema'}"]) == 0
    printed = capsys.readouterr().out
    assert "### systema metrics" in printed and "### gears metrics" not in printed
    assert "mae" not in pd.read_csv(tmp_path / "systema" / "metrics.csv").columns
    assert main(["evaluate", "--config", str(REPO / "configs/evaluate.toml"),
                 f"--data.store_uri={store}", "--metrics", "gears,scib"]) == 2
    assert "metrics[1]='scib' is not one of" in capsys.readouterr().err
    assert main(["evaluate", "--config", str(REPO / "configs/evaluate.toml"),
                 f"--data.store_uri={store}", "--models=[]"]) == 2
    assert "set baselines_only = true" in capsys.readouterr().err

    # predict: an unseen combination of two perturbed genes, as .h5ad and .csv
    import anndata as ad

    from pertscale.data.perturbation import PerturbationConfig, load_perturbation_data
    from pertscale.store import open_store

    data = load_perturbation_data(open_store(str(store)),
                                  PerturbationConfig(covariate_column="cell_type"))
    singles = sorted(p.genes[0] for p in data.perturbations.values() if len(p.genes) == 1)
    combo = f"{singles[0]}+{singles[-1]}"
    out = tmp_path / "pred.h5ad"
    assert main(["predict", "--model", "models:/pertscale-genepert@latest", "--perturbations",
                 f"{combo},{singles[1]}", "--control", str(store), "--covariate-column",
                 "cell_type", "--out", str(out)]) == 0
    pred = ad.read_h5ad(out)
    assert list(pred.var_names) == data.genes and pred.n_obs == 4  # 2 perturbations x 2 types
    assert set(pred.obs["perturbation"]) == {combo, singles[1]}
    assert set(pred.obs["cell_type"]) == set(data.conditions["covariate"])
    ctrl = data.mean(data.control_of(data.perturbed[0]))
    cov = data.conditions.at[data.control_of(data.perturbed[0]), "covariate"]
    pulled = pull_model("models:/pertscale-genepert@latest").predictor()
    row = pred[(pred.obs["perturbation"] == singles[1]) & (pred.obs["cell_type"] == cov)]
    np.testing.assert_allclose(
        row.X[0], ctrl + pulled.predict_delta([data.perturbations[singles[1]]])[0], rtol=1e-5,
        atol=1e-5)
    assert main(["predict", "--model", "models:/pertscale-genepert@latest", "--perturbations",
                 combo, "--control", str(store), "--out", str(tmp_path / "pred.csv")]) == 0
    frame = pd.read_csv(tmp_path / "pred.csv")
    assert frame["perturbation"].tolist() == [combo] and frame.shape[1] == 1 + len(data.genes)
    capsys.readouterr()
    assert main(["predict", "--model", "models:/pertscale-genepert@latest", "--perturbations",
                 f"{singles[0]}+NOTAGENE", "--control", str(store), "--out",
                 str(tmp_path / "bad.h5ad")]) == 1
    assert "cannot represent perturbed gene(s) ['NOTAGENE']" in capsys.readouterr().err
    assert not (tmp_path / "bad.h5ad").exists()


def test_fit_on_a_registered_models_gene_table(ray_session, screen, storage_dir, tmp_path):
    """init_from: GenePert's features are the gene table of a registered scgpt; the lineage
    tags name the parent, and an embedding path beside init_from is refused."""
    import torch

    from pertscale.config import ConfigError, load_config
    from pertscale.models import get_spec
    from pertscale.store import open_store
    from pertscale.tracking import RunLogger, TrackingConfig, log_model, pull_model

    store, emb = screen
    spec = get_spec("scgpt")
    job = load_config(REPO / spec.debug_config)
    st = open_store(str(store))
    torch.manual_seed(0)
    module = spec.build(job.model, st.vocab.tokens)
    exported = spec.export(job.model, module.state_dict(), {
        "job": job.to_dict(), "vocab": st.vocab.tokens,
        "gene_symbols": st.var["gene_symbol"].astype(str).tolist()})
    with RunLogger(TrackingConfig(), run_name="scgpt") as logger:
        assert log_model(logger, exported, aliases=["base"]) == "models:/pertscale-scgpt/1"
    config = str(REPO / "configs/genepert.toml")
    assert main(["fit", "genepert", "--config", config, f"--data.store_uri={store}",
                 "--init_from=models:/pertscale-scgpt@base", "--alias", "on_scgpt",
                 f"--report.out_dir={tmp_path / 'rep'}"]) == 0
    child = pull_model("models:/pertscale-genepert@on_scgpt")
    assert child.tags["init_from"] == "models:/pertscale-scgpt@base"
    assert child.tags["init_from_version"] == "models:/pertscale-scgpt/1"
    assert child.tags["store_fingerprint"] == st.fingerprint and "seed=1" in child.tags["split"]
    assert "unseen_single" in child.tags["eval_summary"]
    table = child.state_dict["embeddings"]
    assert torch.allclose(table, module.state_dict()["gene_embedding.weight"][3:].float())
    with pytest.raises(ConfigError, match="both give the gene features"):
        load_config(config, [f"--embeddings.path={emb}", "--init_from=models:/pertscale-scgpt/1"])


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
    assert main(["fit", "genepert", "--config", config, "--model.alphas=[]"]) == 2
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
    assert set(metrics["model"]) == {"genepert", "no_change", "train_mean", "additive",
                                     "matching_mean", "linear"}
    # 33 norman19 perturbations, none of mcfaline23's
    sizes = metrics.drop_duplicates("subgroup").set_index("subgroup")
    assert np.isfinite(metrics[metrics["model"] == "genepert"]["pearson_delta"]).all()
    assert "norman19" not in (tmp_path / "rep" / "per_condition.csv").read_text()
    assert len(sizes) >= 3


def test_kang_stimulus_baselines_only(ray_session, storage_dir, tmp_path, shared_data):
    """A treatment that is not a gene (IFN-beta, 'stim') evaluated with the baselines alone on a
    held-out cell type; undeclared, the same label fails naming it as a gene."""
    kang = shared_data / "kang/kang2018_muscat_example_sce.h5ad"
    store = tmp_path / "kang"
    assert main(["ingest", str(kang), "--out", str(store), "--quiet",
                 "--obs-columns", "group_id,cluster_id,sample_id"]) == 0
    config = str(REPO / "configs/evaluate_kang.toml")
    assert main(["evaluate", "--config", config, f"--data.store_uri={store}",
                 f"--report.out_dir={tmp_path / 'rep'}"]) == 0
    metrics = pd.read_csv(tmp_path / "rep" / "metrics.csv")
    assert set(metrics["subgroup"]) == {"heldout_CD14+ Monocytes"}
    assert set(metrics["model"]) == {"no_change", "train_mean"}
    per = pd.read_csv(tmp_path / "rep" / "per_condition.csv")
    assert "CD14+ Monocytes/stim" in set(per["condition"])
    import mlflow

    from pertscale.paths import default_tracking_uri

    client = mlflow.MlflowClient(default_tracking_uri())
    run = client.search_runs(client.get_experiment_by_name("pertscale-evaluate").experiment_id)[0]
    assert "heldout_CD14_ Monocytes/train_mean/mse_de" in run.data.metrics
    # stim as a gene: the linear baseline looks it up among the measured genes and says so
    assert main(["evaluate", "--config", config, f"--data.store_uri={store}",
                 "--data.perturbation.treatments=[]", '--report.baselines=["linear"]']) == 1
