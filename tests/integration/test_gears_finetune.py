"""GEARS fine-tuned end to end on the paired task: Ray Train, the DeepSpeed engine (ZeRO-2, 2
CPU workers), MLflow; best-epoch export, the lr halving every epoch, exact resume after an
injected failure, registry lineage, init_from a registered scgpt, the cached priors, and the
pulled model through evaluate, predict and a fresh-process pyfunc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pertscale.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from pertscale.data.synthetic import SimulatorConfig, write_dataset

    out = tmp_path_factory.mktemp("gears")
    cfg = SimulatorConfig(n_genes=120, n_cells=1600, n_cell_types=2, n_batches=1,
                          n_single_perturbations=16, n_double_perturbations=6, seed=4)
    write_dataset(cfg, out / "files", store_uri=str(out / "store"))
    return out


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    mp = pytest.MonkeyPatch()
    mp.setenv("PERTSCALE_STORAGE", str(root))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield root
    mp.undo()


def _job(sim: Path, **overrides):
    args = [f"--data.store_uri={sim / 'store'}",
            f"--priors.go_path={sim / 'files' / 'go_annotations.tsv'}",
            "--data.batch_size=16", "--epochs=3", "--trainer.checkpoint_every=7",
            "--trainer.log_every=1"]
    args += [f"--{k}={v}" for k, v in overrides.items()]
    return load_config(REPO / "configs" / "gears_debug.toml", args, job="finetune")


def _weights(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(result.checkpoint_dir) / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(ray_session, sim, storage):
    from pertscale.training.finetune import run_finetune

    return run_finetune(_job(sim, **{"trainer.run_name": "reference"}), show_progress=False)


def test_finetune_trains_validates_registers_and_reports(reference, storage):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / 'mlflow' / 'mlflow.db'}")
    assert reference.model_uri == "models:/pertscale-gears/1"
    run = client.get_run(reference.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["job"] == "finetune"
    # one validation per epoch; the export holds the best of them
    val = client.get_metric_history(reference.mlflow_run_id, "val_mse_de")
    assert len(val) == 3
    best = min(val, key=lambda m: m.value)
    assert reference.training["best_step"] == best.step
    assert reference.training["best_val_mse_de"] == pytest.approx(best.value)
    # the step schedule halves the rate every epoch
    steps_per_epoch = reference.training["final_step"] // 3
    lr = {m.step: m.value for m in client.get_metric_history(reference.mlflow_run_id, "lr")}
    assert lr[1] == pytest.approx(1e-3)
    assert lr[steps_per_epoch + 1] == pytest.approx(5e-4)
    assert lr[2 * steps_per_epoch + 1] == pytest.approx(2.5e-4)
    for name in ("autofocus", "direction", "mse", "loss"):
        assert client.get_metric_history(reference.mlflow_run_id, name), name
    # registry: lineage and the evaluation summary
    version = client.get_model_version("pertscale-gears", "1")
    assert version.tags["task"] == "finetune" and version.tags["split"].startswith("simulation")
    summary = json.loads(version.tags["eval_summary"])
    assert "unseen_single" in summary
    params = run.data.params
    assert int(params["prepared.go_edges"]) > 0 and int(params["prepared.coexpress_edges"]) > 0
    # the report puts gears beside every baseline on every subgroup
    table = reference.summary
    for group in set(table["subgroup"]):
        models = set(table[table["subgroup"] == group]["model"])
        assert {"gears", "no_change", "train_mean"} <= models, group


def test_resume_after_worker_failure_matches_uninterrupted_run(reference, sim, storage):
    """Rank 1 fails mid-epoch 2 (after a validation and a checkpoint); the restarted run ends
    with the same best epoch, score and exported weights."""
    from pertscale.training.finetune import run_finetune

    steps_per_epoch = reference.training["final_step"] // 3
    fail = steps_per_epoch + 3
    result = run_finetune(_job(sim, **{"trainer.run_name": "failing",
                                       "trainer.fail_at_step": fail,
                                       "tracking.enabled": "false"}), show_progress=False)
    meta = json.loads((Path(result.checkpoint_dir) / "meta.json").read_text())
    assert meta["resumed_from"] is not None and meta["resumed_from"] < fail
    assert result.training == reference.training
    a, b = _weights(result), _weights(reference)
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).norm()
                      / b[k].double().norm().clamp(min=1e-12)) for k in b)
    assert worst <= 1e-6
    assert result.model_uri is None  # tracking off: nothing registered


def test_pulled_model_predicts_cells_and_loads_in_a_fresh_process(reference, sim, storage,
                                                                   tmp_path):
    import anndata as ad

    from pertscale.cli import run_command
    from pertscale.data.perturbation import parse_perturbation
    from pertscale.tracking import pull_model

    genes = sorted({g for p in _data_perturbations(sim) for g in p.lstrip("-").split("+")})
    labels = [f"{genes[0]}+{genes[-1]}", f"-{genes[1]}"]  # an unseen combination, an inhibition
    out = tmp_path / "pred.h5ad"
    assert run_command("predict", ["--model", "models:/pertscale-gears@latest",
                                   "--perturbations", ",".join(labels),
                                   "--control", str(sim / "store"),
                                   "--covariate-column", "cell_type",
                                   "--out", str(out)]) == 0
    adata = ad.read_h5ad(out)
    assert adata.n_vars == 120 and np.isfinite(adata.X).all()
    assert sorted(set(adata.obs["perturbation"])) == sorted(
        parse_perturbation(lbl).name for lbl in labels)
    expected = pull_model("models:/pertscale-gears/1").predictor().predict_delta(
        [parse_perturbation(lbl) for lbl in labels])
    # per-cell predictions: drawn control cells of each cell type, each plus the change
    cells_out = tmp_path / "cells.h5ad"
    assert run_command("predict", ["--model", "models:/pertscale-gears/1",
                                   "--perturbations", ",".join(labels),
                                   "--control", str(sim / "store"), "--cells", "3",
                                   "--covariate-column", "cell_type",
                                   "--out", str(cells_out)]) == 0
    cells = ad.read_h5ad(cells_out)
    assert cells.n_obs == 2 * 2 * 3  # perturbations x cell types x cells
    from pertscale.data.paired import read_dense_rows
    from pertscale.store import open_store

    src = open_store(str(sim / "store"))
    first = cells.obs.iloc[0]
    row = int(first["control_cell"])
    assert str(src.obs["perturbation"].iloc[row]) == "ctrl"
    assert str(src.obs["cell_type"].iloc[row]) == str(first["cell_type"])
    x = read_dense_rows(src, np.array([row]), log_normalise=True, target_sum=1e4)[0]
    k = labels.index(next(lbl for lbl in labels
                          if parse_perturbation(lbl).name == first["perturbation"]))
    np.testing.assert_allclose(cells.X[0], x + expected[k], rtol=1e-5, atol=1e-5)
    code = ("import mlflow, pandas as pd; "
            "m = mlflow.pyfunc.load_model('models:/pertscale-gears/1'); "
            f"print(m.predict(pd.DataFrame({{'perturbation': {labels!r}}})).to_json())")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{storage / 'mlflow/mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pandas as pd

    frame = pd.read_json(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(frame.to_numpy(), expected, rtol=1e-6, atol=1e-9)


def test_init_from_a_registered_scgpt_initialises_matching_genes(ray_session, sim, storage):
    """Gene embeddings start from a registered scgpt's gene table (PCA to the hidden size,
    unit rows) where symbols match; the lineage names the parent and the matched count."""
    from mlflow import MlflowClient

    from pertscale.models import get_spec
    from pertscale.store import open_store
    from pertscale.tracking import RunLogger, TrackingConfig, log_model
    from pertscale.training.finetune import run_finetune

    spec = get_spec("scgpt")
    sc_job = load_config(REPO / spec.debug_config)
    st = open_store(str(sim / "store"))
    torch.manual_seed(0)
    module = spec.build(sc_job.model, st.vocab.tokens)
    exported = spec.export(sc_job.model, module.state_dict(), {
        "job": sc_job.to_dict(), "vocab": st.vocab.tokens,
        "gene_symbols": st.var["gene_symbol"].astype(str).tolist()})
    with RunLogger(TrackingConfig(), run_name="scgpt") as logger:
        parent = log_model(logger, exported, aliases=["base"])
    result = run_finetune(_job(sim, **{"init_from": "models:/pertscale-scgpt@base",
                                       "epochs": 1, "trainer.run_name": "init"}),
                          show_progress=False)
    assert result.init == {"init_from": "models:/pertscale-scgpt@base",
                           "init_from_version": parent, "init_genes_matched": "120/120"}
    client = MlflowClient(f"sqlite:///{storage / 'mlflow' / 'mlflow.db'}")
    name, version = result.model_uri.removeprefix("models:/").split("/")
    tags = client.get_model_version(name, version).tags
    assert tags["init_from"] == "models:/pertscale-scgpt@base"
    assert tags["init_genes_matched"] == "120/120"


def _data_perturbations(sim: Path) -> list[str]:
    from pertscale.store import open_store

    labels = open_store(str(sim / "store")).obs["perturbation"].astype(str)
    return sorted({lbl for lbl in labels if lbl not in ("ctrl", "control")})


def test_scgpt_perturb_starts_from_a_registered_scgpt_and_is_reported_beside_gears(
        reference, ray_session, sim, storage, tmp_path):
    """scGPT's perturbation task fine-tuned from a registered scgpt under ZeRO-3: at a learning
    rate of 1e-30 the exported weights are the parent's (to 1e-12; a step moves a zero by 1e-30) (transformer, value encoder, decoder, gene rows), so what
    init_from copies survives partitioning; registered as pertscale-scgpt_perturb with lineage,
    and `pertscale evaluate` reports it beside GEARS and the baselines in one table."""
    import pandas as pd

    from pertscale.cli import main
    from pertscale.models import get_spec
    from pertscale.models.scgpt_perturb import SHARED_PREFIXES
    from pertscale.store import open_store
    from pertscale.tracking import RunLogger, TrackingConfig, log_model
    from pertscale.training.finetune import run_finetune

    spec = get_spec("scgpt")
    sc_job = load_config(REPO / spec.debug_config)
    st = open_store(str(sim / "store"))
    torch.manual_seed(3)
    module = spec.build(sc_job.model, st.vocab.tokens)
    parent = {k: v.detach().clone() for k, v in module.state_dict().items()}
    exported = spec.export(sc_job.model, module.state_dict(), {
        "job": sc_job.to_dict(), "vocab": st.vocab.tokens,
        "gene_symbols": st.var["gene_symbol"].astype(str).tolist()})
    with RunLogger(TrackingConfig(), run_name="scgpt") as logger:
        version = log_model(logger, exported, aliases=["perturb_base"])
    job = load_config(REPO / "configs" / "scgpt_perturb_debug.toml",
                      [f"--data.store_uri={sim / 'store'}", "--epochs=1", "--engine.lr=1e-30",
                       "--engine.zero_stage=3", "--trainer.run_name=scgpt_perturb",
                       "--init_from=models:/pertscale-scgpt@perturb_base"], job="finetune")
    result = run_finetune(job, show_progress=False)
    assert result.init["init_from_version"] == version
    assert result.init["init_genes_matched"] == "120/120"
    weights = _weights(result)
    shared = [k for k in parent if k.startswith(SHARED_PREFIXES)]
    assert len(shared) > 10 and int(result.init["init_tensors"]) == len(shared) + 1
    for key in shared:
        torch.testing.assert_close(weights[key], parent[key], rtol=0, atol=1e-12, msg=key)
    torch.testing.assert_close(weights["gene_embedding.weight"],
                               parent["gene_embedding.weight"][3:], rtol=0, atol=1e-12)
    assert result.model_uri.startswith("models:/pertscale-scgpt_perturb/")
    summary = result.summary
    assert {"unseen_single", "combo_seen2"} <= set(
        summary.loc[summary["model"] == "scgpt_perturb", "subgroup"])

    out = tmp_path / "both"
    assert main(["evaluate", "--config", str(REPO / "configs/evaluate.toml"),
                 f"--data.store_uri={sim / 'store'}", f"--report.out_dir={out}",
                 ("--models=[\"models:/pertscale-gears@latest\", "
                  "\"models:/pertscale-scgpt_perturb@latest\"]"),
                 "--report.baselines=[\"no_change\", \"train_mean\", \"additive\"]"]) == 0
    table = pd.read_csv(out / "metrics.csv")
    models = {m.split("-v")[0] for m in table.loc[table["subgroup"] == "unseen_single", "model"]}
    assert models == {"gears", "scgpt_perturb", "no_change", "train_mean"}
