"""scgen end to end on simulated cells: `pertscale finetune` with one cell type held out trains on
2 Ray workers, scores the loss on held-out cells every epoch and stops early on it, registers the
best epoch with its latent deltas, and (prediction = "change") predicts the held-out type's
response better than no change and than the generic train-mean change.

NOTE: on the default simulator (`response = "graph"`) scGen does not beat the other types' mean
change (measured, R^2 of means DE: scgen 0.969, other types' mean 0.975, no change 0.962): a
perturbation's log-fold changes there are the same in every cell type but for dropped edges,
and they do not follow the axes the controls vary along, so the other types' mean is close to
the truth and the VAE has nothing to transfer. Where responses are shifts of program activities
on types with their own gene baselines (`response = "programs"`, `cell_type_gene_sd`), scGen's
premise holds and it beats the other types' mean (`test_scgen_transfers_a_program_response...`).
With scGen's own prediction ("cells": shifted cells decoded, minus the observed control mean)
the decoder's reconstruction error of the controls (MSE 0.11 against no change's 0.04) swamps
the small graph effects (Pearson delta DE 0.05). On Kang, where the response is large, scGen
beats both baselines (`pertscale bench scgen`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pertscale.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> dict:
    from pertscale.data.synthetic import SimulatorConfig, write_dataset

    out = tmp_path_factory.mktemp("sim")
    # NOTE: strong cell-type baselines make the same log-fold change look different in log1p
    # space from type to type: what scGen's decoder can transfer and a mean change cannot.
    cfg = SimulatorConfig(n_genes=300, n_cells=6000, n_cell_types=3, n_batches=1,
                          n_single_perturbations=12, n_double_perturbations=0,
                          cell_type_shift_sd=1.5, seed=4)
    write_dataset(cfg, out / "files", store_uri=str(out / "store"))
    return {"store": str(out / "store"), "files": out / "files"}


@pytest.fixture(scope="module")
def sim_store(sim) -> str:
    return sim["store"]


def test_scgen_moves_perturbations_to_a_held_out_type(sim_store, storage_dir):
    import ray

    from pertscale.tracking import pull_model
    from pertscale.training.finetune import run_finetune

    job = load_config(REPO_ROOT / "configs" / "scgen.toml",
                      [f"--data.store_uri={sim_store}", "--epochs=15", "--patience=3",
                       "--model.prediction=change", "--trainer.run_name=scgen-sim"],
                      job="finetune")
    try:
        result = run_finetune(job, show_progress=False)
    finally:
        ray.shutdown()
    # early stopping: the validation ELBO once per epoch (its full KL grows as training goes on);
    # the run stopped `patience` epochs after its best and exported the last epoch, as scGen
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{storage_dir / 'mlflow' / 'mlflow.db'}")
    val = client.get_metric_history(result.mlflow_run_id, "val_elbo")
    training = result.training
    assert len(val) == training["epochs_run"]
    best = min(range(len(val)), key=lambda i: (val[i].value, i))
    assert training["best_step"] == val[best].step
    assert training["best_val_elbo"] == pytest.approx(val[best].value)
    assert training["stopped_early"] and len(val) < 15
    assert len(val) - 1 - best == 3 and training["exported"] == "last"
    assert training["final_step"] == val[-1].step
    summary = result.summary.set_index("model")
    print(result.table)  # gears and scgen metric families
    r2, pearson = summary["r2_pearson_mean_de"], summary["pearson_delta_de"]
    assert r2["scgen"] > r2["no_change"] and r2["scgen"] > r2["train_mean"]
    assert pearson["scgen"] > pearson["train_mean"] + 0.15
    pulled = pull_model(result.model_uri)
    assert pulled.config["covariates"] == ["cell_type_1", "cell_type_2", "cell_type_3"]
    delta = pulled.state_dict["scgen.delta"]
    assert delta.shape == (12, 100) and np.isfinite(delta.numpy()).all()


@pytest.fixture(scope="module")
def program_sim_store(tmp_path_factory) -> str:
    """Responses that are shifts of program activities (`response = "programs"`): the same
    log-fold changes in every type, on types whose gene baselines differ (`cell_type_gene_sd`),
    so the counts show them differently from type to type."""
    from pertscale.data.synthetic import SimulatorConfig, write_dataset

    out = tmp_path_factory.mktemp("program_sim")
    cfg = SimulatorConfig(n_genes=300, n_cells=6000, n_cell_types=3, n_batches=1,
                          n_single_perturbations=12, n_double_perturbations=0,
                          cell_type_shift_sd=1.5, cell_type_gene_sd=2.0,
                          program_activity_sd=1.0, response="programs", seed=0)
    write_dataset(cfg, out / "files", store_uri=str(out / "store"))
    return str(out / "store")


def test_scgen_transfers_a_program_response_better_than_the_other_types_mean(
        program_sim_store, storage_dir):
    """Where a perturbation moves cells along the programs their controls vary along, scGen's
    latent arithmetic predicts the held-out type's response better than the other types' mean
    change: the cell type's own genes decide what the counts show.

    Measured here (seed 0; seed 4 in brackets), scgen against the other types' mean: Pearson
    delta DE 0.784 / 0.676 (0.831 / 0.714), MSE DE 0.240 / 0.289 (0.263 / 0.265), R^2 of means
    DE 0.928 / 0.916 (0.901 / 0.904: R^2 of means is not asserted against it)."""
    import ray

    from pertscale.training.finetune import run_finetune

    job = load_config(REPO_ROOT / "configs" / "scgen.toml",
                      [f"--data.store_uri={program_sim_store}", "--epochs=15", "--patience=0",
                       "--model.prediction=change", "--trainer.run_name=scgen-programs",
                       "--tracking.register=false"], job="finetune")
    try:
        result = run_finetune(job, show_progress=False)
    finally:
        ray.shutdown()
    summary = result.summary.set_index("model")
    print(result.table)
    r2, pearson = summary["r2_pearson_mean_de"], summary["pearson_delta_de"]
    mse = summary["mse_de"]
    assert r2["scgen"] > r2["no_change"] + 0.05
    assert pearson["scgen"] > pearson["matching_mean"] + 0.03
    assert mse["scgen"] < mse["matching_mean"]


def test_scgen_on_a_pretrained_pathway_vae_encoder(sim, storage_dir):
    """`model.encoder = "pathway_vae"`: scGen's VAE with a registered pathway_vae's encoder
    (its weights, pathways and latent size), fine-tuned, registered with it, and learning."""
    import ray

    from pertscale.tracking import pull_model
    from pertscale.training.commands import run_pretrain
    from pertscale.training.finetune import run_finetune

    files = sim["files"]
    pretrain = load_config(REPO_ROOT / "configs" / "pathway_vae_debug.toml",
                           [f"--data.store_uri={sim['store']}", "--trainer.max_steps=150",
                            f"--model.pathways.gmt={files / 'gene_sets.gmt'}",
                            f"--model.pathways.dag_edges={files / 'go_dag_edges.tsv'}",
                            "--trainer.run_name=pv-for-scgen"], job="pretrain")
    job = load_config(REPO_ROOT / "configs" / "scgen.toml",
                      [f"--data.store_uri={sim['store']}", "--epochs=6", "--patience=0",
                       "--model.encoder=pathway_vae",
                       "--init_from=models:/pertscale-pathway_vae/1",
                       "--model.prediction=change", "--trainer.run_name=scgen-pv"],
                      job="finetune")
    try:
        parent = run_pretrain(pretrain, show_progress=False)
        result = run_finetune(job, show_progress=False)
    finally:
        ray.shutdown()
    assert parent.model_uri == "models:/pertscale-pathway_vae/1"
    assert result.init["init_from"] == parent.model_uri
    assert result.init["init_genes_matched"] == "300/300"
    pulled = pull_model(result.model_uri)
    assert pulled.config["encoder_parent"]["config"]["pathways"] == \
        pull_model(parent.model_uri).config["pathways"]
    assert pulled.state_dict["scgen.delta"].shape == (12, 16)  # the pathway_vae's latent
    summary = result.summary.set_index("model")
    print(result.table)
    r2 = summary["r2_pearson_mean_de"]
    assert r2["scgen"] > r2["no_change"] and r2["scgen"] > r2["train_mean"]
