"""pathway_vae on real data: pretrained on Kang 2018 IFN-beta PBMCs with GO biological-process
pathways (`configs/pathway_vae_kang.toml`), the pathways whose activity moves most between
stimulated and control cells of each cell type are interferon-response terms."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pertscale.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
IFN_TERMS = {"GO:0035455",  # response to interferon-alpha
             "GO:0060339",  # negative regulation of type I interferon-mediated signaling
             "GO:0060333",  # interferon-gamma-mediated signaling pathway
             "GO:0035458",  # cellular response to interferon-beta
             "GO:0032607"}  # interferon-alpha production


def test_interferon_pathways_lead_the_stimulation_discrepancy(shared_data, ray_session,
                                                              storage_dir, tmp_path,
                                                              monkeypatch):
    from pertscale.embedding import embed_store
    from pertscale.store.ingest import IngestConfig, ingest
    from pertscale.training.commands import run_pretrain

    monkeypatch.chdir(REPO)  # the config names ../shared/data relative to the repository
    store = tmp_path / "kang"
    ingest([shared_data / "kang" / "kang2018_muscat_example_sce.h5ad"], store,
           IngestConfig(obs_columns=["group_id", "cluster_id", "sample_id"]))
    job = load_config(REPO / "configs" / "pathway_vae_kang.toml",
                      [f"--data.store_uri={store}", "--trainer.max_steps=300"], job="pretrain")
    result = run_pretrain(job, show_progress=False)
    out = embed_store(result.model_uri, str(store), tmp_path / "kang.zarr",
                      perturbation_column="group_id", control_labels=("ctrl",),
                      covariate_column="cluster_id", log_run=False)
    table: pd.DataFrame = out["table"]
    top = table[table["rank"] <= 3]
    print(top[["covariate", "rank", "pathway_id", "pathway_name", "cohens_d", "q"]])
    assert set(IFN_TERMS) <= set(table["pathway_id"])  # the selection keeps them
    led = [cov for cov, group in top.groupby("covariate")
           if set(group["pathway_id"]) & IFN_TERMS]
    assert len(led) == 5, f"interferon terms lead in {led} only"
    assert (top[top["pathway_id"].isin(IFN_TERMS)]["q"] < 1e-10).all()
