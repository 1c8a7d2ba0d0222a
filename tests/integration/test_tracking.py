"""MLflow tracking and registry against a real SQLite store and a real MLflow server process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

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


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    return {"w": lin.weight.detach(), "b": lin.bias.detach(), "tied": lin.weight.detach()}


def test_embedded_default_logs_registers_and_pulls(storage_dir):
    cfg = TrackingConfig(experiment="t")
    sd = _state_dict()
    with RunLogger(cfg, run_name="r1") as logger:
        assert logger.uri == f"sqlite:///{storage_dir / 'mlflow' / 'mlflow.db'}"
        logger.log_params({"model": {"name": "scgpt", "d": 8}, "lr": 0.1})
        logger.log_metrics({"loss": 1.5}, step=1)
        logger.log_metrics({"loss": 0.5}, step=2)
        uri = log_model(logger, "toy", sd, {"name": "toy", "d": 8}, ["<pad>", "G1"],
                        tags={"store_fingerprint": "abc"})
        run_id = logger.run_id
    assert uri == "models:/pertscale-toy/1"
    run = logger.client.get_run(run_id)
    assert run.data.params["model.name"] == "scgpt" and run.info.status == "FINISHED"
    history = logger.client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 0.5)]
    # artifacts live under the storage root, not the working directory
    assert (storage_dir / "mlflow" / "artifacts").is_dir()

    pulled = pull_model("models:/pertscale-toy@latest")
    assert pulled.version == "1" and pulled.vocab == ["<pad>", "G1"]
    assert pulled.config == {"name": "toy", "d": 8}
    assert torch.equal(pulled.state_dict["w"], sd["w"])
    assert pulled.tags["store_fingerprint"] == "abc" and "code_version" in pulled.tags

    # a second version moves the alias; the old one stays pullable by number
    with RunLogger(cfg, run_name="r2") as logger:
        log_model(logger, "toy", {k: v + 1 for k, v in sd.items()}, {"name": "toy"}, ["<pad>"])
    assert pull_model("models:/pertscale-toy@latest").version == "2"
    assert torch.equal(pull_model("models:/pertscale-toy/1").state_dict["b"], sd["b"])


def test_pull_errors_name_the_problem(storage_dir):
    with RunLogger(TrackingConfig(), run_name="r") as logger:
        log_model(logger, "toy", _state_dict(), {}, [])
    with pytest.raises(RegistryError, match="must look like models:/NAME@ALIAS"):
        pull_model("pertscale-toy")
    with pytest.raises(RegistryError, match=r"does not resolve.*registered models: \['pertscale-toy'\]"):
        pull_model("models:/pertscale-toy@nope")


def test_tampered_artifact_fails_verification(storage_dir):
    with RunLogger(TrackingConfig(), run_name="r") as logger:
        log_model(logger, "toy", _state_dict(), {}, [])
    weights = next((storage_dir / "mlflow" / "artifacts").rglob("model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="model.safetensors fails verification"):
        pull_model("models:/pertscale-toy@latest")


def test_unreachable_server_warns_and_never_raises(storage_dir):
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{_free_port()}")
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="unreachable"):
        logger = RunLogger(cfg, run_name="r")
    logger.log_params({"a": 1})
    logger.log_metrics({"loss": 1.0}, step=0)
    assert log_model(logger, "toy", _state_dict(), {}, []) is None
    logger.end()
    assert not logger.active and time.monotonic() - start < 10


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
        uri = log_model(logger, "toy", _state_dict(), {"name": "toy"}, ["<pad>", "<cls>"])
    assert uri == "models:/pertscale-toy/1"
    assert cli_main(["pull", "models:/pertscale-toy@latest", "--dst", str(tmp_path / "pulled")]) == 0
    out = capsys.readouterr().out
    assert "pulled pertscale-toy version 1" in out and "vocab size: 2" in out
    assert (tmp_path / "pulled").rglob("model.safetensors")
