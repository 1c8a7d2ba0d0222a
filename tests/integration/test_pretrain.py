"""Pretraining end to end on a local Ray cluster with the DeepSpeed engine on 2 CPU workers:
exact resume after an injected worker failure (ZeRO-2), ZeRO-3 against ZeRO-2, MLflow run
contents, and an unreachable tracking server."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from pertscale.config import load_config

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
N_GENES, N_CELLS = 120, 1200


@pytest.fixture(scope="module")
def sim_store(tmp_path_factory) -> str:
    from pertscale.data.synthetic import SimulatorConfig, build_ground_truth, simulate_blocks
    from pertscale.store import StoreWriter

    cfg = SimulatorConfig(n_genes=N_GENES, n_cells=N_CELLS, n_single_perturbations=8,
                          n_double_perturbations=2, seed=3)
    truth = build_ground_truth(cfg)
    uri = str(tmp_path_factory.mktemp("stores") / "sim")
    with StoreWriter(uri, var=truth.var(), raw_counts=True,
                     source={"file": "simulated", "sha256": "-"}) as w:
        for x, obs in simulate_blocks(cfg, 600, truth=truth):
            w.append(x, obs)
    return uri


def _job(store: str, **overrides):
    args = [f"--data.store_uri={store}", "--trainer.max_steps=12",
            "--trainer.checkpoint_every=4", "--trainer.log_every=2"]
    args += [f"--{k}={v}" for k, v in overrides.items()]
    return load_config(REPO_ROOT / "configs" / "debug_cpu.toml", args, job="pretrain")


def _weights(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(result.model_dir / "model.safetensors"))


def _progress(result) -> list[dict]:
    ckpt = Path(result.checkpoint_dir)
    return [json.loads((ckpt / f"progress_rank{r}.json").read_text()) for r in range(2)]


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in a)


@pytest.fixture(scope="module")
def reference_run(ray_session, sim_store, tmp_path_factory):
    """An uninterrupted 2-worker ZeRO-2 fp32 run, tracked in an embedded MLflow database."""
    from pertscale.training.commands import run_pretrain

    mp = pytest.MonkeyPatch()
    storage = tmp_path_factory.mktemp("storage")
    mp.setenv("PERTSCALE_STORAGE", str(storage))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        result = run_pretrain(_job(sim_store, **{"trainer.run_name": "reference"}),
                              show_progress=False)
    finally:
        mp.undo()
    return result, storage


def test_reference_run_is_tracked_in_mlflow(reference_run):
    from mlflow import MlflowClient

    result, storage = reference_run
    assert result.metrics["step"] == 12 and result.metrics["final"]
    # every rank consumed 12 steps x 16 cells
    assert [p["cells"] for p in _progress(result)] == [12 * 16, 12 * 16]
    client = MlflowClient(f"sqlite:///{storage / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["engine.zero_stage"] == "2"
    assert run.data.params["engine.ds_config.zero_optimization.stage"] == "2"
    assert run.data.params["engine.optimizer_kernel"] == "torch.optim.AdamW"  # CPUs: not fused
    for name in ("loss", "lr", "cells_per_s", "tokens_per_s"):
        history = client.get_metric_history(result.mlflow_run_id, name)
        assert [m.step for m in history] == [2, 4, 6, 8, 10, 12], name
    loss = [m.value for m in client.get_metric_history(result.mlflow_run_id, "loss")]
    assert loss[-1] < loss[0]
    lr = [m.value for m in client.get_metric_history(result.mlflow_run_id, "lr")]
    assert max(lr) == pytest.approx(1e-3, rel=0.05) and lr[-1] < 0.1 * max(lr)  # warmup+cosine
    # the registered model holds the final weights, the config and the vocabulary
    assert result.model_uri == "models:/pertscale-scgpt/1"
    from pertscale.tracking import pull_model

    mp = pytest.MonkeyPatch()
    mp.setenv("PERTSCALE_STORAGE", str(storage))
    try:
        pulled = pull_model(result.model_uri)
    finally:
        mp.undo()
    weights = _weights(result)
    assert pulled.state_dict.keys() == weights.keys()
    assert all(torch.equal(pulled.state_dict[k], weights[k]) for k in weights)
    assert pulled.config["model"] == "scgpt" and pulled.config["model_config"]["flavor"] == "debug"
    assert pulled.config["tokenizer"]["layout"] == "packed"
    assert pulled.vocab[:3] == ["<pad>", "<cls>", "<mask>"] and len(pulled.vocab) == N_GENES + 3


def test_resume_after_worker_failure_matches_uninterrupted_run(reference_run, sim_store,
                                                               storage_dir):
    """Rank 1 raises after 6 steps; Ray restarts both workers from the step-4 checkpoint and
    the run ends with the same weights, having consumed the same cells in the same order."""
    from pertscale.training.commands import run_pretrain

    reference, _ = reference_run
    job = _job(sim_store, **{"trainer.fail_at_step": 6, "trainer.run_name": "failing",
                             "tracking.enabled": "false"})
    result = run_pretrain(job, show_progress=False)
    meta = json.loads((Path(result.checkpoint_dir) / "meta.json").read_text())
    assert meta["resumed_from"] == 4  # the failure happened and the restart restored step 4
    reference_meta = json.loads((Path(reference.checkpoint_dir) / "meta.json").read_text())
    assert reference_meta["resumed_from"] is None
    assert _progress(result) == _progress(reference)
    a, b = _weights(result), _weights(reference)
    rel = {k: float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in b}
    worst = max(rel, key=rel.get)
    assert rel[worst] <= 1e-6, (worst, rel[worst], sorted(rel.items(), key=lambda kv: -kv[1])[:5])


def test_zero3_matches_zero2_and_tolerates_unreachable_tracking(reference_run, sim_store,
                                                                storage_dir, monkeypatch):
    from pertscale.training.commands import run_pretrain

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block exits
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    reference, _ = reference_run
    job = _job(sim_store, **{"engine.zero_stage": 3, "trainer.run_name": "zero3"})
    with pytest.warns(RuntimeWarning, match="unreachable"):
        result = run_pretrain(job, show_progress=False)
    assert result.model_uri is None and result.mlflow_run_id is None
    assert _progress(result) == _progress(reference)
    weights = _weights(result)
    # ZeRO-3 gathers the full (unsharded) weights into the final checkpoint
    assert {k: v.shape for k, v in weights.items()} == \
        {k: v.shape for k, v in _weights(reference).items()}
    # NOTE: the same math up to float summation order (ZeRO-3 reduce-scatters gradients in
    # other groupings than ZeRO-2); Adam's per-element normalisation lifts those 1e-7 roundings
    # of near-zero gradients to ~1e-5 in 12 steps. A sharding bug shows as O(1) differences.
    assert _max_rel_diff(weights, _weights(reference)) <= 1e-4
