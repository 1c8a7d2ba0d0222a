"""Bad input and faults, one row each: the command ends within its limit with the expected exit
code and one line on stderr that names the problem (no traceback), and files written before it
stay as they were."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

LIMIT_S = 120
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small raw-count .h5ad, its store, and a plain file to aim outputs below."""
    from pertscale.bench.ingest import write_simulated_h5ad
    from pertscale.store.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("bad")
    h5ad = root / "cells.h5ad"
    write_simulated_h5ad(h5ad, 3000, 200, nnz_per_cell=20.0)
    ingest([h5ad], root / "store", IngestConfig())
    _write_unlabelled_and_unnamed(h5ad, root)
    ingest([root / "unlabelled.h5ad"], root / "unlabelled", IngestConfig())
    (root / "plain.txt").write_text("a user's file\n")
    (root / "plain.npz").write_text("genes,emb\n")  # a text file under an .npz name
    (root / "userdir").mkdir()
    (root / "userdir" / "notes.txt").write_text("a user's notes\n")
    return root


def _write_unlabelled_and_unnamed(h5ad: Path, root: Path) -> None:
    """Copies of the cells with 5 perturbation labels missing, and with one gene id empty."""
    import anndata as ad
    import numpy as np

    adata = ad.read_h5ad(h5ad)
    labels = adata.obs["perturbation"].astype(object).to_numpy()
    labels[:5] = np.nan
    adata.obs["perturbation"] = labels
    adata.write_h5ad(root / "unlabelled.h5ad")
    adata.var_names = ["" if i == 7 else g for i, g in enumerate(adata.var_names)]
    adata.write_h5ad(root / "unnamed.h5ad")


def run(args: list[str], cwd: Path, *, timeout: float = LIMIT_S,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pertscale", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def digest(root: Path) -> dict[str, str]:
    """Every file under `root` (the user's and the earlier commands') by content, and every
    folder (nothing half-made is left behind)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "folder" for p in sorted(root.rglob("*"))}


def assert_one_line(proc: subprocess.CompletedProcess, command: str, code: int,
                    words: list[str]) -> None:
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"pertscale {command}: "), err[-2000:]
    for word in words:
        assert word in last, (word, last)


UNREACHABLE_S3 = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                  "AWS_SECRET_ACCESS_KEY": "y", "PERTSCALE_STORE_TIMEOUT_S": "3"}
EVALUATE = ["evaluate", "--config", "REPO/configs/evaluate.toml", "--data.store_uri=WORLD/store",
            "--data.perturbation.sign_column=\"\"", "--data.perturbation.sign_values={}",
            "--tracking.enabled=false"]
BASELINES_ONLY = ["--models=[]", "--baselines_only=true"]
CASES = [
    # id, argv (WORLD = the fixture folder), exit code, words of the line, environment
    ("info-unreachable-s3-endpoint", ["info", "s3://bucket/store"], 1,
     ["s3://bucket/store", "http://127.0.0.1:9", "no answer within 3 s",
      "PERTSCALE_STORE_TIMEOUT_S"], UNREACHABLE_S3),
    ("store-timeout-not-a-number", ["info", "s3://bucket/store"], 1,
     ["PERTSCALE_STORE_TIMEOUT_S='soon'"], {"PERTSCALE_STORE_TIMEOUT_S": "soon"}),
    ("stats-too-many-top-genes", ["stats", "WORLD/store", "--n-top-genes", "5000"], 1,
     ["--n-top-genes=5000", "200 genes"], {}),
    ("stats-out-below-a-file", ["stats", "WORLD/store", "--out", "WORLD/plain.txt/out"], 1,
     ["WORLD/plain.txt/out", "Not a directory"], {}),
    ("ingest-out-below-a-file", ["ingest", "WORLD/cells.h5ad", "--out", "WORLD/plain.txt/s"], 1,
     ["WORLD/plain.txt/s", "Not a directory"], {}),
    ("pull-missing-sqlite-db", ["pull", "models:/pertscale-scgpt@champion", "--tracking-uri",
                                "sqlite:///WORLD/nothere/mlflow.db"], 1,
     ["WORLD/nothere/mlflow.db does not exist", "--tracking-uri"], {}),
    ("fit-tracking-database-in-a-missing-folder",
     ["fit", "genepert", "--config", "REPO/configs/genepert.toml", "--data.store_uri=WORLD/store",
      "--tracking.uri=sqlite:///WORLD/nothere/mlflow.db"], 2,
     ["tracking.uri=sqlite:///WORLD/nothere/mlflow.db", "WORLD/nothere does not exist"], {}),
    ("pretrain-tracking-database-in-a-missing-folder",
     ["pretrain", "--config", "REPO/configs/scgpt_debug.toml", "--data.store_uri=WORLD/store",
      "--tracking.uri=sqlite:///WORLD/nothere/mlflow.db"], 2,
     ["tracking.uri=sqlite:///WORLD/nothere/mlflow.db", "WORLD/nothere does not exist"], {}),
    ("pretrain-absurd-lr", ["pretrain", "--config", "REPO/configs/scgpt_debug.toml",
                            "--data.store_uri=WORLD/store", "--engine.lr=1e6"], 2,
     ["engine.lr=1000000.0 is outside (0.0, 1.0]"], {}),
    ("pretrain-warmup-past-the-run", ["pretrain", "--config", "REPO/configs/scgpt_debug.toml",
                                      "--data.store_uri=WORLD/store",
                                      "--engine.warmup_steps=500"], 2,
     ["engine.warmup_steps=500 is not below trainer.max_steps=200"], {}),
    ("finetune-warmup-past-the-run", ["finetune", "--config", "REPO/configs/scgen_debug.toml",
                                      "--data.store_uri=WORLD/store", "--data.split.heldout=K562",
                                      "--engine.lr_schedule=cosine",
                                      "--engine.warmup_steps=100000",
                                      "--tracking.enabled=false"], 2,
     ["engine.warmup_steps=100000 is not below the run's", "epochs=2 x"], {}),
    ("ingest-a-directory", ["ingest", "WORLD/store", "--out", "WORLD/s2"], 1,
     ["WORLD/store is a directory, not an .h5ad file"], {}),
    ("genepert-text-file-named-npz", ["fit", "genepert", "--config",
                                      "REPO/configs/genepert.toml",
                                      "--data.store_uri=WORLD/store",
                                      "--data.perturbation.sign_column=\"\"",
                                      "--data.perturbation.sign_values={}",
                                      "--embeddings.path=WORLD/plain.npz"], 1,
     ["WORLD/plain.npz", "not an .npz archive"], {}),
    ("pretrain-bf16-on-cpus", ["pretrain", "--config", "REPO/configs/scgpt_debug.toml",
                               "--data.store_uri=WORLD/store", "--engine.precision=bf16"], 2,
     ["engine.precision='bf16' needs trainer.use_gpu=true"], {}),
    ("pretrain-fp16-on-cpus", ["pretrain", "--config", "REPO/configs/scgpt_debug.toml",
                               "--data.store_uri=WORLD/store", "--engine.precision=fp16"], 2,
     ["engine.precision='fp16' needs trainer.use_gpu=true"], {}),
    ("pretrain-fp32-flash-on-gpus", ["pretrain", "--config", "REPO/configs/scgpt_debug.toml",
                                     "--data.store_uri=WORLD/store", "--trainer.use_gpu=true"], 2,
     ["engine.precision='fp32' with model.attention='auto'", "bf16/fp16",
      "engine.precision = 'bf16'"], {}),
    ("pretrain-flash-attn-on-cpus", ["pretrain", "--config", "REPO/configs/scgpt_debug.toml",
                                     "--data.store_uri=WORLD/store",
                                     "--model.attention=flash_attn"], 2,
     ["model.attention='flash_attn' runs on CUDA only"], {}),
    ("pretrain-lr-nan", ["pretrain", "--config", "REPO/configs/scgpt_debug.toml",
                         "--data.store_uri=WORLD/store", "--engine.lr=nan"], 2,
     ["engine.lr=nan is not a finite number"], {}),
    ("ingest-the-same-file-twice", ["ingest", "WORLD/cells.h5ad", "WORLD/./cells.h5ad", "--out",
                                    "WORLD/s3"], 1, ["cells.h5ad is given twice"], {}),
    ("ingest-into-a-store", ["ingest", "WORLD/cells.h5ad", "--out", "WORLD/store/X/nested"], 1,
     ["is inside the store WORLD/store"], {}),
    ("stats-out-a-file", ["stats", "WORLD/store", "--out", "WORLD/plain.txt"], 1,
     ["output WORLD/plain.txt exists and is not a directory"], {}),
    ("ingest-a-bad-parameter-makes-no-store", ["ingest", "WORLD/cells.h5ad", "--out", "WORLD/s5",
                                               "--compression-level", "30"], 2,
     ["compression_level=30 is outside [1, 22]"], {}),
    ("simulate-out-a-file", ["simulate", "--out", "WORLD/plain.txt"], 1,
     ["WORLD/plain.txt exists and is not a directory"], {}),
    ("simulate-overwrite-a-users-folder", ["simulate", "--out", "WORLD/userdir", "--overwrite"],
     1, ["WORLD/userdir is not empty and was not written by pertscale"], {}),
    # NOTE: rank 0 may run on another node of a cluster: a database file here loses its metrics
    ("pretrain-cluster-with-a-sqlite-tracking-uri",
     ["pretrain", "--config", "REPO/configs/scgpt_debug.toml", "--data.store_uri=WORLD/store",
      "--tracking.uri=sqlite:///WORLD/mlflow.db", "--address", "127.0.0.1:9"], 2,
     ["sqlite:///WORLD/mlflow.db", "--address 127.0.0.1:9", "mlflow server"], {}),
    ("finetune-cluster-with-a-file-tracking-uri",
     ["finetune", "--config", "REPO/configs/scgen_debug.toml", "--data.store_uri=WORLD/store",
      "--tracking.uri=WORLD/mlruns", "--address", "auto"], 2,
     ["WORLD/mlruns", "--address auto", "mlflow server"], {}),
    ("pretrain-s3-run-storage-without-a-bucket",
     ["pretrain", "--config", "REPO/configs/scgpt_debug.toml", "--data.store_uri=WORLD/store",
      "--tracking.enabled=false", "--trainer.storage_path=s3://"], 2,
     ["trainer.storage_path='s3://'", "s3://BUCKET/PREFIX"], {}),
    ("pretrain-unreachable-ray-cluster", ["pretrain", "--config", "REPO/configs/scgpt_debug.toml",
                                          "--data.store_uri=WORLD/store",
                                          "--tracking.enabled=false", "--address",
                                          "127.0.0.1:9"], 1,
     ["Ray cluster at 127.0.0.1:9 is not reachable", "PERTSCALE_RAY_TIMEOUT_S"], {}),
    # NOTE: here the credential lookup hangs (then the limit names gcs://bucket/store); where
    # it fails at once, tensorstore's own message is the line
    ("info-gs-without-credentials-or-network", ["info", "gs://bucket/store"], 1, [],
     {"PERTSCALE_STORE_TIMEOUT_S": "3"}),
    ("simulate-out-below-a-file", ["simulate", "--out", "WORLD/plain.txt/sim"], 1,
     ["WORLD/plain.txt", "Not a directory"], {}),
    ("pull-unreachable-server", ["pull", "models:/pertscale-scgpt@champion", "--tracking-uri",
                                 "http://127.0.0.1:9"], 1, ["http://127.0.0.1:9"], {}),
    ("verify-unreachable-s3-endpoint", ["verify", "s3://bucket/store"], 1,
     ["s3://bucket/store", "http://127.0.0.1:9", "no answer within 3 s"], UNREACHABLE_S3),
    # NOTE: no words, as for info on gs:// above
    ("pretrain-gs-store-without-credentials-or-network",
     ["pretrain", "--config", "REPO/configs/scgpt_debug.toml", "--data.store_uri=gs://bucket/s",
      "--tracking.enabled=false"], 1, [], {"PERTSCALE_STORE_TIMEOUT_S": "3"}),
    ("evaluate-unreachable-server", [*EVALUATE, "--tracking.enabled=true",
                                     "--tracking.uri=http://127.0.0.1:9"], 1,
     ["models:/pertscale-genepert@latest", "http://127.0.0.1:9"], {}),
    # the linear baseline is fitted in a Ray task (test_an_error_inside_a_ray_task_... below)
    ("evaluate-error-inside-a-ray-task", [*EVALUATE, *BASELINES_ONLY], 1,
     ["linear baseline", "are not measured", "linear.pert_embedding = 'table'"], {}),
    ("evaluate-cells-without-a-label", [*EVALUATE, *BASELINES_ONLY,
                                        "--data.store_uri=WORLD/unlabelled"], 1,
     ["WORLD/unlabelled", "5 cell(s) have no perturbation label"], {}),
    ("ingest-an-empty-gene-id", ["ingest", "WORLD/unnamed.h5ad", "--out", "WORLD/s4"], 1,
     ["WORLD/unnamed.h5ad", "1 gene id(s) in var are empty", "var row 7"], {}),
    # NOTE: /sys refuses new entries even to root
    ("simulate-out-not-permitted", ["simulate", "--out", "/sys/pertscale-sim"], 1,
     ["/sys/pertscale-sim: "], {}),
    ("stats-out-not-permitted", ["stats", "WORLD/store", "--out", "/sys/pertscale-stats"], 1,
     ["/sys/pertscale-stats: "], {}),
    ("ingest-out-not-permitted", ["ingest", "WORLD/cells.h5ad", "--out", "/sys/pertscale-s"], 1,
     ["/sys/pertscale-s: "], {}),
    ("export-an-unknown-gene", ["export", "WORLD/store", "--out", "WORLD/sub.h5ad", "--genes",
                                "NOPE"], 1, ["--genes", "NOPE", "not in store"], {}),
    ("export-over-a-users-file", ["export", "WORLD/store", "--out", "WORLD/cells.h5ad"], 1,
     ["WORLD/cells.h5ad exists", "--overwrite"], {}),
    ("export-into-a-missing-folder", ["export", "WORLD/store", "--out", "WORLD/nowhere/a.h5ad"],
     1, ["WORLD/nowhere", "does not exist"], {}),
    ("export-an-unknown-obs-value", ["export", "WORLD/store", "--out", "WORLD/sub.h5ad",
                                     "--cells", "perturbation=NOPE"], 1,
     ["perturbation", "NOPE"], {}),
    ("migrate-a-users-folder", ["migrate", "WORLD/userdir"], 1, ["WORLD/userdir"], {}),
    ("migrate-a-remote-store", ["migrate", "s3://bucket/store"], 1,
     ["s3://bucket/store", "migrate rewrites local stores"], {}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, case):
    _, argv, code, words, env = case
    argv = [a.replace("WORLD", str(world)).replace("REPO", str(REPO)) for a in argv]
    before = digest(world)
    proc = run(argv, world, timeout=60, env=env)  # limits in the rows are shorter
    assert_one_line(proc, argv[0], code, [w.replace("WORLD", str(world)) for w in words])
    assert digest(world) == before
    assert not (world / "nothere").exists()  # no tracking database made for a typo


def test_an_error_inside_a_ray_task_is_its_own_line_and_debug_keeps_the_trace(world):
    """The linear baseline's refusal above is raised in a Ray task: the line is the task's own
    message, and --debug (PERTSCALE_DEBUG=1) keeps Ray's traceback for a bug report."""
    argv = [a.replace("WORLD", str(world)).replace("REPO", str(REPO))
            for a in [*EVALUATE, *BASELINES_ONLY]]
    proc = run(argv, world, env={"PERTSCALE_DEBUG": "1"})
    assert proc.returncode != 0
    assert "ray.exceptions.RayTaskError(ValueError)" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("answer", [b"HTTP/1.0 400 Bad Request\r\n\r\n", None],
                         ids=["a-web-server", "a-silent-listener"])
def test_an_address_that_is_not_a_ray_head_is_refused_within_the_limit(world, answer):
    """Something else on the port would hold `ray.init` for minutes (measured: past 160 s for a
    web server); pertscale checks that the address speaks gRPC first."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]

    def serve():
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.recv(64)
            if answer is not None:
                conn.sendall(answer)
            time.sleep(10)

    threading.Thread(target=serve, daemon=True).start()
    t0 = time.monotonic()
    try:
        proc = run(["pretrain", "--config", "configs/scgpt_debug.toml",
                    f"--data.store_uri={world / 'store'}", "--tracking.enabled=false",
                    "--address", f"127.0.0.1:{port}"], REPO, timeout=60,
                   env={"PERTSCALE_RAY_TIMEOUT_S": "2"})
    finally:
        server.close()
    if answer is None:
        words = [f"Ray cluster at 127.0.0.1:{port} did not answer within 2 s",
                 "PERTSCALE_RAY_TIMEOUT_S"]
    else:
        words = [f"127.0.0.1:{port} answers but is not a Ray head"]
    assert_one_line(proc, "pretrain", 1, words)
    assert time.monotonic() - t0 < 60


def test_a_real_ray_head_passes_the_check(ray_session):
    import ray

    from pertscale.cluster import _check_reachable

    _check_reachable(ray.get_runtime_context().gcs_address)  # raises if refused


def test_a_gpu_run_on_a_machine_without_gpus_is_refused_not_waited_for(world):
    """Ray would wait for GPUs forever; the run is refused once the cluster is up, and Ray's
    token-authentication notice is not printed."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    t0 = time.monotonic()
    proc = run(["pretrain", "--config", "configs/scgpt_debug.toml",
                f"--data.store_uri={world / 'store'}", "--trainer.use_gpu=true",
                "--engine.precision=bf16",  # a valid GPU config (fp32 + flash is refused first)
                "--tracking.enabled=false"], REPO, timeout=90)
    assert_one_line(proc, "pretrain", 2, ["cannot be placed", "0 GPU",
                                          "trainer.use_gpu=false"])
    assert "Token authentication" not in proc.stderr
    assert time.monotonic() - t0 < 90


def test_ctrl_c_during_an_overwrite_ends_in_one_line_and_keeps_the_old_store(world, tmp_path):
    from pertscale.bench.ingest import write_simulated_h5ad
    from pertscale.store import open_store
    from pertscale.store.verify import verify_store
    from pertscale.store.writer import staging_path

    big = tmp_path / "big.h5ad"
    write_simulated_h5ad(big, 600_000, 2000, nnz_per_cell=50.0)
    store = world / "store"
    fingerprint = open_store(store).fingerprint
    # NOTE: Ctrl-C in a terminal reaches a command whose SIGINT raises KeyboardInterrupt; a test
    # runner started in the background (`cmd &` without job control) ignores SIGINT, and its
    # children inherit that, so the command installs Python's handler itself here
    interruptible = ("import runpy, signal, sys; signal.signal(signal.SIGINT, "
                     "signal.default_int_handler); sys.argv[0] = 'pertscale'; "
                     "runpy.run_module('pertscale', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", interruptible, "ingest", str(big), "--out",
                             str(store), "--overwrite"], stderr=subprocess.PIPE, text=True)
    staging = staging_path(store)
    deadline = time.monotonic() + 60
    while not staging.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # start-up, then the new store is being written beside the old
    time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=LIMIT_S)[1]
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "pertscale ingest: interrupted"
    assert open_store(store).fingerprint == fingerprint and verify_store(store).ok
    assert sorted(p.name for p in world.iterdir() if p.name.startswith(".")) == []


def test_cells_without_counts_are_kept_with_a_warning(tmp_path):
    """Not a refusal: all-zero cells are real (empty droplets kept by a filter), but ingest and
    stats say how many there are, since their size factor is 0."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    x = sp.random(40, 30, density=0.3, format="csr", random_state=0, dtype=np.float32)
    x.data = np.ceil(x.data * 10)
    x = sp.csr_matrix(x.toarray() * (np.arange(40) % 10 != 3)[:, None])  # 4 empty cells
    ad.AnnData(x, obs=pd.DataFrame(index=[f"c{i}" for i in range(40)]),
               var=pd.DataFrame(index=[f"g{i}" for i in range(30)])).write_h5ad(tmp_path / "a.h5ad")
    proc = run(["ingest", str(tmp_path / "a.h5ad"), "--out", str(tmp_path / "s"), "--quiet"],
               tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "4 of 40 cells have no nonzero value" in proc.stderr
    proc = run(["stats", str(tmp_path / "s")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warning: 4 of 40 cells have no counts: their size factor is 0" in proc.stderr


def test_counts_ingested_as_normalised_values_are_kept_with_a_warning(world, tmp_path):
    proc = run(["ingest", str(world / "cells.h5ad"), "--out", str(tmp_path / "s"), "--values",
                "normalised", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("every stored value is an integer: these look like raw counts, not normalised "
            "values; if they are counts, ingest with --values raw_counts") in proc.stderr
    proc = run(["ingest", str(world / "cells.h5ad"), "--out", str(tmp_path / "c"), "--quiet"],
               tmp_path)
    assert proc.returncode == 0 and "look like raw counts" not in proc.stderr, proc.stderr


def test_a_store_that_fails_its_check_is_not_trained_on(world, tmp_path):
    """Before any worker starts: the default (metadata) check names a missing shard; with
    trainer.verify_store=full a changed byte is found too."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(world / "store", store)
    args = ["pretrain", "--config", str(REPO / "configs/scgpt_debug.toml"),
            f"--data.store_uri={store}", "--tracking.enabled=false"]
    shard = store / "X/data/c/0"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shard.write_bytes(bytes(blob))
    proc = run([*args, "--trainer.verify_store=full"], tmp_path)
    assert_one_line(proc, "pretrain", 1, ["fails its full check", "X/data/c/0 is corrupt",
                                          "pertscale verify"])
    shard.unlink()
    proc = run(args, tmp_path)
    assert_one_line(proc, "pretrain", 1, ["fails its metadata check", "X/data/c/0 is missing",
                                          "trainer.verify_store=off"])


def test_a_damaged_metadata_document_is_named(world, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(world / "store", store)
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": ')
    proc = run(["info", str(store)], tmp_path)
    assert_one_line(proc, "info", 1, [f"{store}/zarr.json is not a valid JSON document",
                                      "re-ingest"])


def test_a_server_that_never_answers_ends_within_the_request_limits(tmp_path, monkeypatch):
    """MLflow's defaults (7 retries of 120 s, backoff) would hold `pull` for many minutes;
    pertscale sets 30 s x (1 + 2 retries) unless the user set them. Here the user's shorter
    limits show the call ends with one line naming the server."""
    import socket

    from pertscale.tracking.logger import MLFLOW_REQUEST_LIMITS, bound_mlflow_requests

    for name in MLFLOW_REQUEST_LIMITS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # a user's own value stays
    bound_mlflow_requests()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections (the kernel does), never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    t0 = time.monotonic()
    try:
        proc = run(["pull", "models:/pertscale-scgpt@champion", "--tracking-uri", url],
                   tmp_path, timeout=60, env={"MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
                                              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    finally:
        silent.close()
    assert_one_line(proc, "pull", 1, [url])
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("after_s", [0.4, 1.0, 2.0])
def test_ctrl_c_at_any_moment_of_a_command_is_one_line(world, after_s):
    """During start-up (imports: an extension's import turns Ctrl-C into an ImportError) or
    during the work, Ctrl-C ends the command with 'interrupted' and exit 130."""
    proc = subprocess.Popen([sys.executable, "-m", "pertscale", "stats", str(world / "store"),
                             "--flavor", "seurat_v3"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=LIMIT_S)[1]
    if proc.returncode == 0:
        pytest.skip(f"the command ended before {after_s} s")
    assert "Traceback" not in err, err[-2000:]
    if proc.returncode == -signal.SIGINT:
        # NOTE: a signal landing after the work, as the interpreter exits (its handlers are
        # already reset), ends it by SIGINT itself with nothing to say; a shell reports 130
        return
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "pertscale stats: interrupted", err[-2000:]
