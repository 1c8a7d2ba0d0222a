"""A real network hop: two network namespaces with their own addresses, joined by a veth pair
(both made and removed here; the addresses exist only inside them). A Ray head and an MLflow
server run in one, a second Ray node in the other; a 2-worker ZeRO-2 scGPT pretrain and a GEARS
fine-tune from it run across the two nodes (one worker each), every worker logging to the one
MLflow server over the link. Skipped, with the reason, where namespaces cannot be made."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TAG = f"{os.getpid() % 100000}"
NS = (f"psnet-a{TAG}", f"psnet-b{TAG}")
VETH = (f"psva{TAG}", f"psvb{TAG}")  # interface names: at most 15 characters
SUBNET = f"10.213.{os.getpid() % 250}"
IPS = (f"{SUBNET}.1", f"{SUBNET}.2")
RAY_PORT, MLFLOW_PORT = 6379, 5000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def link():
    """The two namespaces and the veth pair between them (removed afterwards)."""
    try:
        _ip("netns", "add", NS[0])
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        pytest.skip(f"cannot make a network namespace here ({detail.strip()}); needs root and "
                    "iproute2")
    try:
        _ip("netns", "add", NS[1])
        _ip("link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1])
        for ns, veth, ip in zip(NS, VETH, IPS):
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        for ns in NS:  # deleting a namespace deletes its end of the pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False,
                           timeout=30)


class Processes:
    """Long-running processes started inside a namespace, each in its own process group."""

    def __init__(self, env: dict[str, str]):
        self.env, self.procs = env, []

    def start(self, ns: str, args: list[str], log: Path, **env: str) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], env={**self.env, **env},
                                stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_listening(ns: str, ip: str, port: int, proc: subprocess.Popen, what: str,
                    log: Path) -> None:
    probe = f"import socket; socket.create_connection(('{ip}', {port}), timeout=1).close()"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}")
        if subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe],
                          capture_output=True, check=False, timeout=30).returncode == 0:
            return
        time.sleep(1)
    raise RuntimeError(f"{what} is not listening on {ip}:{port} after 90 s")


@pytest.fixture(scope="module")
def cluster(link, tmp_path_factory):
    """Head + MLflow server in namespace A, a second Ray node in B; the simulated screen."""
    from pertscale.data.synthetic import SimulatorConfig, write_dataset

    root = tmp_path_factory.mktemp("netcluster")
    cfg = SimulatorConfig(n_genes=120, n_cells=1600, n_cell_types=2, n_batches=1,
                          n_single_perturbations=16, n_double_perturbations=6, seed=4)
    write_dataset(cfg, root / "files", store_uri=str(root / "store"))
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "PERTSCALE_STORAGE": str(root / "storage"), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    procs = Processes(env)
    try:
        db = root / "mlflow.db"
        mlflow = procs.start(NS[0], [str(BIN / "mlflow"), "server", "--backend-store-uri",
                                     f"sqlite:///{db}", "--artifacts-destination",
                                     str(root / "artifacts"), "--host", IPS[0], "--port",
                                     str(MLFLOW_PORT), "--workers", "1"], root / "mlflow.log")
        _wait_listening(NS[0], IPS[0], MLFLOW_PORT, mlflow, "mlflow server", root / "mlflow.log")
        # NOTE: short session paths (unix sockets) and one per node
        head = procs.start(NS[0], [str(BIN / "ray"), "start", "--head", "--block",
                                   f"--node-ip-address={IPS[0]}", f"--port={RAY_PORT}",
                                   "--num-cpus=1", "--include-dashboard=false"],
                           root / "head.log", RAY_TMPDIR=f"/tmp/psnet-a{TAG}")
        _wait_listening(NS[0], IPS[0], RAY_PORT, head, "ray head", root / "head.log")
        procs.start(NS[1], [str(BIN / "ray"), "start", "--block",
                            f"--address={IPS[0]}:{RAY_PORT}", f"--node-ip-address={IPS[1]}",
                            "--num-cpus=1"], root / "node.log", RAY_TMPDIR=f"/tmp/psnet-b{TAG}")
        yield root, db, procs
    finally:
        procs.stop()


def _driver(cluster, *args: str) -> subprocess.CompletedProcess:
    """A pertscale command run in namespace A against the head and the MLflow server there."""
    procs = cluster[2]
    return subprocess.run(
        ["ip", "netns", "exec", NS[0], sys.executable, "-m", "pertscale", *args,
         "--address", f"{IPS[0]}:{RAY_PORT}", "--no-progress",
         f"--tracking.uri=http://{IPS[0]}:{MLFLOW_PORT}", "--trainer.num_workers=2",
         "--trainer.cpus_per_worker=1", "--trainer.torch_threads=1"],
        env={**procs.env, "PERTSCALE_RAY_TIMEOUT_S": "90"}, capture_output=True, text=True,
        timeout=900, check=False)


def _check_both_nodes_logged(client, run_id: str) -> None:
    run = client.get_run(run_id)
    nodes = {run.data.tags.get(f"rank{r}.node_ip") for r in range(2)}
    assert nodes == set(IPS), run.data.tags  # one worker on each side of the link
    for r in range(2):
        history = client.get_metric_history(run_id, f"rank{r}.cells_per_s")
        assert history and all(m.value > 0 for m in history), r


def test_pretrain_and_gears_across_two_namespaces_log_to_one_mlflow_server(cluster):
    from mlflow import MlflowClient

    root, db, _ = cluster
    pretrain = _driver(cluster, "pretrain", "--config", str(REPO / "configs" / "scgpt_debug.toml"),
                       f"--data.store_uri={root / 'store'}", "--trainer.max_steps=24",
                       "--trainer.log_every=4", "--trainer.checkpoint_every=12")
    assert pretrain.returncode == 0, pretrain.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{db}")  # the server's database (its address is in A only)
    scgpt = client.get_model_version("pertscale-scgpt", "1")
    _check_both_nodes_logged(client, scgpt.run_id)
    loss = client.get_metric_history(scgpt.run_id, "loss")
    assert [m.step for m in loss] == [4, 8, 12, 16, 20, 24]
    assert client.get_run(scgpt.run_id).data.params["trainer.world_size"] == "2"

    gears = _driver(cluster, "finetune", "--config", str(REPO / "configs" / "gears_debug.toml"),
                    f"--data.store_uri={root / 'store'}",
                    f"--priors.go_path={root / 'files' / 'go_annotations.tsv'}",
                    "--data.batch_size=16", "--init_from=models:/pertscale-scgpt/1")
    assert gears.returncode == 0, gears.stderr[-4000:]
    version = client.get_model_version("pertscale-gears", "1")
    assert version.tags["init_from_version"] == "models:/pertscale-scgpt/1"
    _check_both_nodes_logged(client, version.run_id)
    # the weights went through the server to its artifact store
    assert list((root / "artifacts").rglob("model.safetensors"))
