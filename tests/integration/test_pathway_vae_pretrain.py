"""pathway_vae end to end: pretraining with ZeRO-2 on 2 Ray workers from the README's config,
registered with its pathway selection, exact resume after an injected failure, and
`pertscale embed` (zarr and h5ad outputs, the discrepancy table, its MLflow run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pertscale.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> dict:
    from pertscale.data.synthetic import SimulatorConfig, write_dataset

    out = tmp_path_factory.mktemp("sim")
    cfg = SimulatorConfig(n_genes=150, n_cells=1200, n_programs=6, n_cell_types=2,
                          n_batches=1, n_single_perturbations=6, n_double_perturbations=0,
                          seed=3)
    write_dataset(cfg, out / "files", store_uri=str(out / "store"))
    return {"store": str(out / "store"), "files": out / "files"}


def _job(sim: dict, **overrides):
    files = sim["files"]
    args = [f"--data.store_uri={sim['store']}", "--trainer.max_steps=12", "--engine.warmup_steps=3",
            "--trainer.checkpoint_every=4", "--trainer.log_every=2",
            f"--model.pathways.gmt={files / 'gene_sets.gmt'}",
            f"--model.pathways.dag_edges={files / 'go_dag_edges.tsv'}"]
    args += [f"--{k}={v}" for k, v in overrides.items()]
    return load_config(REPO_ROOT / "configs" / "pathway_vae_debug.toml", args, job="pretrain")


def _weights(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(result.model_dir / "model.safetensors"))


def _progress(result) -> list[dict]:
    ckpt = Path(result.checkpoint_dir)
    return [json.loads((ckpt / f"progress_rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("storage")
    mp.setenv("PERTSCALE_STORAGE", str(root))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def reference_run(ray_session, sim, storage):
    from pertscale.training.commands import run_pretrain

    return run_pretrain(_job(sim, **{"trainer.run_name": "pv-reference"}), show_progress=False)


def test_pretrain_registers_the_model_with_its_pathways(reference_run, sim, storage):
    from mlflow import MlflowClient

    from pertscale.data.pathways import PathwaySelectionConfig, select_pathways
    from pertscale.store import open_store
    from pertscale.tracking import pull_model

    result = reference_run
    assert result.model_uri == "models:/pertscale-pathway_vae/1"
    client = MlflowClient(f"sqlite:///{storage / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["engine.ds_config.zero_optimization.stage"] == "2"
    assert run.data.params["prepared.likelihood"] == "nb"  # the store holds raw counts
    loss = [m.value for m in client.get_metric_history(result.mlflow_run_id, "recon_nll")]
    assert len(loss) == 6 and loss[-1] < loss[0]
    pulled = pull_model(result.model_uri)
    store = open_store(sim["store"])
    expected = select_pathways(
        PathwaySelectionConfig(gmt=str(sim["files"] / "gene_sets.gmt"),
                               dag_edges=str(sim["files"] / "go_dag_edges.tsv")),
        store.var["gene_symbol"].astype(str).tolist())
    assert pulled.config["pathways"] == expected.to_dict()  # the pathway tokens travel with it
    assert run.data.params["prepared.pathways"] == str(expected.num_pathways)
    assert pulled.config["likelihood"] == "nb" and pulled.config["raw_counts"] is True


def test_resume_after_worker_failure_matches_uninterrupted_run(reference_run, sim, storage):
    from pertscale.training.commands import run_pretrain

    job = _job(sim, **{"trainer.fail_at_step": 6, "trainer.run_name": "pv-failing",
                       "tracking.enabled": "false"})
    result = run_pretrain(job, show_progress=False)
    meta = json.loads((Path(result.checkpoint_dir) / "meta.json").read_text())
    assert meta["resumed_from"] == 4
    assert _progress(result) == _progress(reference_run)
    a, b = _weights(result), _weights(reference_run)
    assert a.keys() == b.keys()
    rel = {k: float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in b}
    worst = max(rel, key=rel.get)
    assert rel[worst] <= 1e-6, (worst, rel[worst])


def test_embed_writes_latents_activities_and_the_discrepancy_table(reference_run, sim, storage,
                                                                   tmp_path, capsys):
    import anndata as ad
    import zarr
    from mlflow import MlflowClient

    from pertscale.cli import main
    from pertscale.store import open_store
    from pertscale.tracking import pull_model

    uri = reference_run.model_uri
    zarr_out, h5ad_out = tmp_path / "cells.zarr", tmp_path / "cells.h5ad"
    assert main(["embed", "--model", uri, "--store", sim["store"], "--out", str(zarr_out),
                 "--batch-size", "500", "--perturbation-column", "perturbation",
                 "--covariate-column", "cell_type"]) == 0
    assert main(["embed", "--model", uri, "--store", sim["store"], "--out", str(h5ad_out),
                 "--batch-size", "333", "--no-log"]) == 0
    store = open_store(sim["store"])
    group = zarr.open_group(str(zarr_out), mode="r")
    latent, act = group["latent"][:], group["pathway_activity"][:]
    embedder = pull_model(uri).predictor()
    assert latent.shape == (store.n_cells, embedder.dim)
    assert act.shape == (store.n_cells, len(embedder.pathway_ids))
    assert group.attrs["pathway_ids"] == embedder.pathway_ids
    # any batch size gives the model's own encoding of the cells, row for row
    x = store.read_csr(100, 140)
    mu, a = embedder.encode_csr(x.indptr.astype(np.int64), x.indices, x.data)
    np.testing.assert_allclose(latent[100:140], mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(act[100:140], a, rtol=1e-5, atol=1e-5)
    adata = ad.read_h5ad(h5ad_out)
    assert list(adata.obs_names) == [str(c) for c in store.obs.index]
    # another batch size: the same values up to float summation order
    np.testing.assert_allclose(adata.obsm["X_pathway_vae"], latent, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adata.obsm["pathway_activity"], act, rtol=1e-5, atol=1e-6)

    table = pd.read_csv(tmp_path / "cells.discrepancy.tsv", sep="\t")
    obs = store.obs
    is_ctrl = obs["perturbation"].astype(str).isin(["ctrl", "control"])
    perturbed = obs.loc[~is_ctrl, ["perturbation", "cell_type"]]
    n_groups = len(perturbed.drop_duplicates())
    assert len(table) == n_groups * len(embedder.pathway_ids)
    first = table[(table["perturbation"] == table["perturbation"].iloc[0])
                  & (table["covariate"] == table["covariate"].iloc[0])]
    assert list(first["rank"]) == list(range(1, len(first) + 1))
    assert np.all(np.diff(first["cohens_d"].abs().to_numpy()) <= 1e-12)  # ranked by |d|
    # one row checked by hand: the group's activities against its cell type's controls
    row = first.iloc[0]
    col = embedder.pathway_ids.index(row["pathway_id"])
    in_group = ((obs["perturbation"].astype(str) == row["perturbation"])
                & (obs["cell_type"].astype(str) == row["covariate"])).to_numpy()
    in_ctrl = (is_ctrl & (obs["cell_type"].astype(str) == row["covariate"])).to_numpy()
    g, c = act[in_group, col].astype(np.float64), act[in_ctrl, col].astype(np.float64)
    pooled = np.sqrt(((len(g) - 1) * g.var(ddof=1) + (len(c) - 1) * c.var(ddof=1))
                     / (len(g) + len(c) - 2))
    assert row["cohens_d"] == pytest.approx((g.mean() - c.mean()) / pooled, rel=1e-4)
    from scipy.stats import ttest_ind

    assert row["p"] == pytest.approx(ttest_ind(g, c, equal_var=False).pvalue, rel=1e-3)
    assert (tmp_path / "cells.discrepancy.png").stat().st_size > 10_000
    client = MlflowClient(f"sqlite:///{storage / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pertscale-embed")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["store_fingerprint"] == store.fingerprint
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "discrepancy")}
    assert logged == {"discrepancy/cells.discrepancy.tsv", "discrepancy/discrepancy.png"}
    # an existing output is refused and left as it was
    before = (zarr_out / "zarr.json").read_bytes()
    assert main(["embed", "--model", uri, "--store", sim["store"], "--out", str(zarr_out)]) == 1
    assert f"--out {zarr_out} exists" in capsys.readouterr().err
    assert (zarr_out / "zarr.json").read_bytes() == before
