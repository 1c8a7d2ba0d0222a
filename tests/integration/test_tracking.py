"""MLflow tracking and registry against a real SQLite store and a real MLflow server process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from pertscale.cli import main as cli_main
from pertscale.tracking import (
    RegistryError,
    RunLogger,
    TrackingConfig,
    log_model,
    pull_model,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exported(seed: int = 0):
    """A real GenePert (ridge on a 3-gene table, 4 readout genes), as its spec exports it."""
    import numpy as np

    from pertscale.models.genepert import SPEC, GenePert, GenePertConfig, GenePertModel

    rng = np.random.default_rng(seed)
    ridge = GenePert(1.0).fit(rng.normal(size=(6, 5)), rng.normal(size=(6, 4)))
    model = GenePertModel(["G1", "G2", "G3", "G4"], ["A", "B", "C"], rng.normal(size=(3, 5)),
                          ridge)
    return SPEC.export(GenePertConfig(alphas=[1.0]), model, {})


def test_embedded_default_logs_registers_and_pulls(storage_dir):
    cfg = TrackingConfig(experiment="t")
    exported = _exported()
    with RunLogger(cfg, run_name="r1") as logger:
        assert logger.uri == f"sqlite:///{storage_dir / 'mlflow' / 'mlflow.db'}"
        logger.log_params({"model": {"name": "scgpt", "d": 8}, "lr": 0.1})
        logger.log_metrics({"loss": 1.5}, step=1)
        logger.log_metrics({"loss": 0.5}, step=2)
        uri = log_model(logger, exported, tags={"store_fingerprint": "abc"})
        run_id = logger.run_id
    assert uri == "models:/pertscale-genepert/1"
    run = logger.client.get_run(run_id)
    assert run.data.params["model.name"] == "scgpt" and run.info.status == "FINISHED"
    history = logger.client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 0.5)]
    # artifacts live under the storage root, not the working directory
    assert (storage_dir / "mlflow" / "artifacts").is_dir()

    pulled = pull_model("models:/pertscale-genepert@latest")
    assert pulled.version == "1" and pulled.vocab == ["G1", "G2", "G3", "G4"]
    assert pulled.config == exported.config
    assert torch.equal(pulled.state_dict["coef"], exported.tensors["coef"])
    assert pulled.tags["store_fingerprint"] == "abc" and "code_version" in pulled.tags
    assert len(pulled.tags["manifest_sha256"]) == 64

    # a second version moves @latest; the old one stays pullable by number
    with RunLogger(cfg, run_name="r2") as logger:
        log_model(logger, _exported(seed=1), aliases=["candidate"])
    assert pull_model("models:/pertscale-genepert@latest").version == "2"
    assert pull_model("models:/pertscale-genepert@candidate").version == "2"
    assert torch.equal(pull_model("models:/pertscale-genepert/1").state_dict["intercept"],
                       exported.tensors["intercept"])
    assert cli_main(["alias", "models:/pertscale-genepert/1", "champion"]) == 0
    assert pull_model("models:/pertscale-genepert@champion").version == "1"


def test_pull_errors_name_the_problem(storage_dir, capsys):
    with RunLogger(TrackingConfig(), run_name="r") as logger:
        log_model(logger, _exported())
    with pytest.raises(RegistryError, match="must look like models:/NAME@ALIAS"):
        pull_model("pertscale-genepert")
    with pytest.raises(RegistryError,
                       match=r"does not resolve.*registered models: \['pertscale-genepert'\]"):
        pull_model("models:/pertscale-genepert@nope")
    assert cli_main(["alias", "models:/pertscale-genepert/1", "latest"]) == 1
    assert "'latest' is reserved" in capsys.readouterr().err


def _registered_folder(storage_dir):
    with RunLogger(TrackingConfig(), run_name="r") as logger:
        log_model(logger, _exported())
    return next((storage_dir / "mlflow" / "artifacts").rglob("manifest.json")).parent


def _fresh_process_predict(uri: str, storage_dir) -> subprocess.CompletedProcess:
    code = ("import sys, mlflow, pandas as pd; "
            f"m = mlflow.pyfunc.load_model({uri!r}); "
            "out = m.predict(pd.DataFrame({'perturbation': ['A', 'A+B', '-C']})); "
            "print(out.shape, list(out.columns), out.to_numpy().round(6).tolist())")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{storage_dir / 'mlflow/mlflow.db'}"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_pyfunc_predicts_in_a_fresh_process(storage_dir):
    """mlflow.pyfunc.load_model(models:/...).predict(df) with nothing but pertscale installed."""
    from pertscale.data.perturbation import parse_perturbation
    from pertscale.models.genepert import load_genepert

    folder = _registered_folder(storage_dir)
    model_dir = folder.parent.parent
    assert (model_dir / "MLmodel").is_file() and (model_dir / "pyfunc_model.py").is_file()
    mlmodel = (model_dir / "MLmodel").read_text()
    assert "signature:" in mlmodel and "code_model" in mlmodel
    assert not list(model_dir.rglob("*.pkl")) and "python_model.pkl" not in mlmodel
    proc = _fresh_process_predict("models:/pertscale-genepert/1", storage_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = load_genepert(_exported()).predict_delta(
        [parse_perturbation(p) for p in ("A", "A+B", "-C")]).round(6).tolist()
    assert proc.stdout.strip() == f"(3, 4) ['G1', 'G2', 'G3', 'G4'] {expected}"


def test_tampered_artifact_fails_verification(storage_dir):
    weights = _registered_folder(storage_dir) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="model.safetensors fails verification"):
        pull_model("models:/pertscale-genepert@latest")
    proc = _fresh_process_predict("models:/pertscale-genepert/1", storage_dir)
    assert proc.returncode != 0 and "model.safetensors fails verification" in proc.stderr


def test_manifest_must_list_every_file_and_match_its_tag(storage_dir):
    folder = _registered_folder(storage_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["config.json"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match="manifest_sha256 tag"):
        pull_model("models:/pertscale-genepert/1")
    # even a manifest that matches its tag must list exactly the folder's files
    from pertscale.tracking import load_model_dir

    with pytest.raises(RegistryError, match=r"lists \['model.safetensors', 'vocab.json'\]"):
        load_model_dir(folder)


def test_a_registered_config_cannot_turn_on_pickle(storage_dir, tmp_path):
    """A registered config that asks for pickle and names a file changes nothing: the model is
    rebuilt from its own tensors, and a rewritten config fails verification before any load."""
    from pertscale.tracking import load_model_dir, save_model_dir

    exported = _exported()
    exported.config["embeddings"] = {"path": str(tmp_path / "evil.pkl"), "allow_pickle": True}
    (tmp_path / "evil.pkl").write_bytes(b"not a pickle: reading it would fail loudly")
    with RunLogger(TrackingConfig(), run_name="r") as logger:
        log_model(logger, exported)
    pulled = pull_model("models:/pertscale-genepert/1")
    pulled.predictor().predict_delta([])  # builds from tensors; never opens evil.pkl
    folder = save_model_dir(tmp_path / "m", _exported())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "allow_pickle": True}))
    with pytest.raises(RegistryError, match="config.json fails verification"):
        load_model_dir(folder)


def test_unreachable_server_warns_and_never_raises(storage_dir):
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{_free_port()}")
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="unreachable"):
        logger = RunLogger(cfg, run_name="r")
    logger.log_params({"a": 1})
    logger.log_metrics({"loss": 1.0}, step=0)
    assert log_model(logger, _exported()) is None
    logger.end()
    assert not logger.active and time.monotonic() - start < 10


def test_a_tracking_database_is_made_only_in_a_folder_that_exists(tmp_path, caplog):
    """A new database in an existing folder is said; a missing folder is a typo, refused before
    MLflow makes it."""
    from pertscale.config import ConfigError

    with pytest.raises(ConfigError, match="the folder .*/typo does not exist"):
        RunLogger(TrackingConfig(uri=f"sqlite:///{tmp_path / 'typo' / 'mlflow.db'}"))
    assert not (tmp_path / "typo").exists()
    logger = RunLogger(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), run_name="r")
    logger.end()
    assert f"a new MLflow database is made at {tmp_path / 'mlflow.db'}" in caplog.text
    caplog.clear()
    RunLogger(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), run_name="r2").end()
    assert "a new MLflow database" not in caplog.text


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(360):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("mlflow server exited at start")
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not come up in 180 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.integration
def test_real_server_round_trip_and_pull_cli(mlflow_server, storage_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with RunLogger(TrackingConfig(), run_name="served") as logger:
        assert logger.uri == mlflow_server
        logger.log_metrics({"loss": 2.0}, step=3)
        uri = log_model(logger, _exported())
    assert uri == "models:/pertscale-genepert/1"
    assert cli_main(["pull", "models:/pertscale-genepert@latest", "--dst",
                     str(tmp_path / "pulled")]) == 0
    out = capsys.readouterr().out
    assert "pulled pertscale-genepert version 1" in out and "vocab size: 4" in out
    assert (tmp_path / "pulled").rglob("model.safetensors")


def test_scgpt_pyfunc_embeds_cells_in_a_fresh_process(storage_dir):
    """The registered scgpt kind: a DataFrame of cells x genes in, cell embeddings out, equal to
    the in-process embedder's."""
    import numpy as np

    from pertscale.config import load_config
    from pertscale.models import get_spec
    spec = get_spec("scgpt")
    job = load_config(Path(__file__).resolve().parents[2] / spec.debug_config)
    vocab = ["<pad>", "<cls>", "<mask>", *(f"ENSG{i:03d}" for i in range(20))]
    torch.manual_seed(0)
    module = spec.build(job.model, vocab)
    exported = spec.export(job.model, module.state_dict(),
                           {"job": job.to_dict(), "vocab": vocab,
                            "gene_symbols": [f"G{i}" for i in range(20)]})
    with RunLogger(TrackingConfig(), run_name="scgpt") as logger:
        assert log_model(logger, exported) == "models:/pertscale-scgpt/1"
    x = np.random.default_rng(0).poisson(1.0, size=(3, 5)).astype(float)
    x[:, 0] += 1  # every cell expresses a gene
    code = ("import mlflow, pandas as pd, numpy as np; "
            "m = mlflow.pyfunc.load_model('models:/pertscale-scgpt/1'); "
            f"x = np.array({x.tolist()}); "
            "out = m.predict(pd.DataFrame(x, columns=['ENSG000', 'ENSG001', 'ENSG002', 'ENSG003', 'ENSG004'])); "
            "print(out.shape, out.to_numpy().round(5).tolist())")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{storage_dir / 'mlflow/mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = spec.load(exported).embed(x, ["G0", "G1", "G2", "ENSG003", "G4"])  # symbols or ids
    assert proc.stdout.strip() == f"(3, 64) {expected.round(5).tolist()}"
