"""Run storage on S3 end to end: a 2-worker ZeRO-2 pretrain whose checkpoints live in a real
local S3-compatible server (moto) survives an injected worker failure (the restarted workers
restore from S3), and the driver reads the final checkpoint through Ray's Checkpoint, not as a
local path: the weights it registers in MLflow equal the ones in the bucket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pertscale.config import load_config

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3_ray(s3_endpoint, tmp_path_factory):
    """An embedded Ray cluster started with the S3 environment, so every worker has it (as the
    nodes of a real cluster have their own credentials), and a storage root of its own."""
    import ray

    from pertscale.training.trainer import worker_env

    mp = pytest.MonkeyPatch()
    for name, value in s3_endpoint.env.items():
        mp.setenv(name, value)
    mp.setenv("PERTSCALE_STORAGE", str(tmp_path_factory.mktemp("storage")))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": worker_env(use_gpu=False, torch_threads=1)})
    try:
        yield s3_endpoint
    finally:
        ray.shutdown()
        mp.undo()


def _keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_pretrain_with_s3_run_storage_resumes_and_registers(s3_ray, tmp_path, write_sim_store):
    from safetensors.torch import load, load_file

    from pertscale.paths import storage_root
    from pertscale.tracking import pull_model
    from pertscale.training.commands import run_pretrain

    s3 = s3_ray
    store = write_sim_store(tmp_path / "sim", n_genes=80, n_cells=800,
                            n_single_perturbations=6, seed=5)
    job = load_config(REPO_ROOT / "configs" / "debug_cpu.toml",
                      [f"--data.store_uri={store}", "--trainer.max_steps=8",
                       "--trainer.checkpoint_every=3", "--trainer.log_every=2",
                       "--trainer.fail_at_step=5", "--trainer.run_name=on-s3",
                       f"--trainer.storage_path=s3://{s3.bucket}/runs"], job="pretrain")
    result = run_pretrain(job, show_progress=False)

    final = f"s3://{s3.bucket}/runs/on-s3/checkpoint_00000008_final"
    assert result.checkpoint_dir == final
    # the checkpoints are in the bucket, nothing under the local run storage
    keys = _keys(s3.client, s3.bucket, "runs/on-s3/")
    assert "runs/on-s3/checkpoint_00000008_final/meta.json" in keys
    assert any(k.startswith("runs/on-s3/checkpoint_00000008_final/engine/") for k in keys)
    assert not (storage_root() / "runs" / "on-s3").exists()
    # rank 1 failed after step 5; the restarted workers restored the step-3 checkpoint from S3
    meta = json.loads(s3.client.get_object(
        Bucket=s3.bucket, Key="runs/on-s3/checkpoint_00000008_final/meta.json")["Body"].read())
    assert meta["resumed_from"] == 3 and meta["final"] and meta["step"] == 8
    progress = [json.loads(s3.client.get_object(
        Bucket=s3.bucket, Key=f"runs/on-s3/checkpoint_00000008_final/progress_rank{r}.json")
        ["Body"].read()) for r in range(2)]
    assert [p["cells"] for p in progress] == [8 * 16, 8 * 16]

    # the driver downloaded model/ and meta.json only, and registered those weights
    assert result.model_dir == storage_root() / "checkpoints" / "on-s3" / \
        "checkpoint_00000008_final" / "model"
    assert not (result.model_dir.parent / "engine").exists()
    in_bucket = load(s3.client.get_object(
        Bucket=s3.bucket,
        Key="runs/on-s3/checkpoint_00000008_final/model/model.safetensors")["Body"].read())
    local = load_file(str(result.model_dir / "model.safetensors"))
    assert local.keys() == in_bucket.keys()
    assert all(torch.equal(local[k], in_bucket[k]) for k in local)
    assert result.model_uri == "models:/pertscale-scgpt/1"
    pulled = pull_model(result.model_uri)
    assert all(torch.equal(pulled.state_dict[k], in_bucket[k]) for k in in_bucket)

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{storage_root() / 'mlflow' / 'mlflow.db'}")
    version = client.get_model_version("pertscale-scgpt", "1")
    assert version.tags["checkpoint"] == final

