"""launch/: every file parses and runs only commands the CLI has, with configs and overrides that
load; every one takes s3 stores and s3 run storage; none hides a failed install. The Slurm
script runs for real under a fake `srun` (local processes: a Ray head, a second Ray node, an
MLflow server, the driver), and `pertscale submit` runs jobs through a real Ray Jobs API."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pertscale.cli import COMMANDS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
BIN = Path(sys.executable).parent


def _check_command(argv: list[str]) -> None:
    """`pertscale COMMAND ARGS` names a command of the CLI and its job file and overrides load."""
    from pertscale.training.commands import parse_training_command

    name, *args = argv
    assert name in COMMANDS, name
    if name in ("pretrain", "finetune"):
        args = [str(REPO / a) if a.startswith("configs/") else a for a in args]
        parse_training_command(name, "", args)  # the config, every override, the job kind


def _pertscale_argv(words: list[str]) -> list[str]:
    """The pertscale arguments of a command line (`pertscale X`, `python -m pertscale X`,
    `"$PERTSCALE" X`)."""
    for i, w in enumerate(words):
        if w in ("pertscale", "$PERTSCALE", "$BIN/pertscale"):
            return words[i + 1:]
        if w == "-m" and words[i + 1] == "pertscale":
            return words[i + 2:]
    raise AssertionError(f"no pertscale command in {words}")


def _shell_pertscale_lines(path: Path) -> list[list[str]]:
    """The pertscale invocations of a shell script (continued lines joined, variables given
    placeholder values)."""
    text = path.read_text().replace("\\\n", " ")
    subst = {"$CONFIG": "configs/scgpt_debug.toml", "$RUN_STORAGE": "s3://bucket/runs",
             "$WORKERS": "2", "$CPUS_PER_WORKER": "1", "$USE_GPU": "false",
             "$SLURM_JOB_ID": "7", "$head_ip:$PORT": "127.0.0.1:6379",
             "$RAY_PORT": "6379"}
    out = []
    for line in text.splitlines():
        if re.match(r'\s*"\$(PERTSCALE|BIN/pertscale)" ', line):
            for k, v in subst.items():
                line = line.replace(k, v)
            words = [w for w in shlex.split(line) if w != "$@"]
            out.append(_pertscale_argv(words))
    return out


@pytest.mark.parametrize("name", ["local_cluster.sh", "slurm_pretrain.sbatch"])
def test_shell_launchers_parse_and_run_real_commands(name):
    path = LAUNCH / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    lines = _shell_pertscale_lines(path)
    assert lines, name
    for argv in lines:
        _check_command([*argv, "--data.store_uri=s3://bucket/store"])
    assert "|| true" not in "".join(line for line in path.read_text().splitlines()
                                    if "pip" in line)


def test_yaml_launchers_parse_run_real_commands_and_take_s3():
    import yaml

    job = yaml.safe_load((LAUNCH / "kuberay_rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    argv = _pertscale_argv(shlex.split(job["spec"]["entrypoint"]))
    _check_command(argv)
    assert "--data.store_uri=s3://pertscale/stores/cellxgene" in argv
    assert any(a.startswith("--trainer.storage_path=s3://") for a in argv)
    # an MLflow server: a job on a cluster refuses a database file
    assert job["spec"]["runtimeEnvYAML"].count("MLFLOW_TRACKING_URI: http")

    text = (LAUNCH / "ray_cluster.yaml").read_text()
    cluster = yaml.safe_load(text)
    for command in cluster["setup_commands"]:
        assert "|| true" not in command  # a failed install fails the node
        for extra in re.findall(r"\.\[(\w+)\]", command):
            assert f"\n{extra} = [" in (REPO / "pyproject.toml").read_text(), extra
    submit = next(line.lstrip("# ").strip() for line in text.splitlines()
                  if "pertscale submit" in line)
    words = shlex.split(submit)
    assert words[:2] == ["pertscale", "submit"] and "--" in words
    inner = words[words.index("--") + 1:]
    _check_command(inner)
    assert "--data.store_uri=s3://bucket/store" in inner
    assert "--trainer.storage_path=s3://bucket/runs" in inner


FAKE_SRUN = """#!/usr/bin/env bash
# srun for tests: drops the allocation options and runs the step here, as a local process
while [ $# -gt 0 ]; do
  case "$1" in -w|--nodelist) shift 2 ;; -*) shift ;; *) break ;; esac
done
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && tr ',' '\\n' <<< "$3"
"""


@pytest.mark.slow
def test_slurm_script_runs_a_two_node_pretrain_under_a_fake_srun(tmp_path, free_port,
                                                                write_sim_store):
    from mlflow import MlflowClient

    fake = tmp_path / "fakebin"
    fake.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    store = write_sim_store(tmp_path / "sim")
    storage = tmp_path / "storage"
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "PATH": f"{fake}:{BIN}:{os.environ['PATH']}", "PERTSCALE_STORAGE": str(storage),
           "PERTSCALE_CONFIG": str(REPO / "configs" / "scgpt_debug.toml"),
           "SLURM_JOB_NODELIST": "node1,node2", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_ID": "42", "OMP_NUM_THREADS": "1",
           "RAY_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()),
           "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(Path("/tmp") / f"ps-slurm-{os.getpid()}"),
           "PERTSCALE_RAY_TIMEOUT_S": "90"}
    env.pop("SLURM_GPUS_PER_NODE", None)
    proc = subprocess.run(["bash", str(LAUNCH / "slurm_pretrain.sbatch"),
                           f"--data.store_uri={store}", "--trainer.max_steps=24",
                           "--trainer.log_every=4", "--trainer.checkpoint_every=12"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the run's checkpoints are in the run storage, named after the Slurm job
    assert (storage / "runs" / "slurm-42" / "checkpoint_00000024_final" / "model").is_dir()
    # rank 0 logged through the MLflow server the script started; the driver registered
    client = MlflowClient(f"sqlite:///{storage / 'mlflow' / 'mlflow.db'}")
    version = client.get_model_version("pertscale-scgpt", "1")
    assert version.tags["ray_run"] == "slurm-42"
    history = client.get_metric_history(version.run_id, "loss")
    assert [m.step for m in history] == [4, 8, 12, 16, 20, 24]
    run = client.get_run(version.run_id)
    assert run.data.params["trainer.num_workers"] == "2"


@pytest.fixture(scope="module")
def jobs_api(start_server, free_port):
    """A real Ray head with its dashboard (the Jobs API), this venv first on its PATH."""
    dash = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_TMPDIR": str(Path("/tmp") / f"ps-jobs-{os.getpid()}")}
    address = f"http://127.0.0.1:{dash}"
    start_server([str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}",
                  "--num-cpus=1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                  f"--dashboard-port={dash}"], f"{address}/api/version", "the Ray dashboard",
                 env=env)
    return address


def _pertscale(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pertscale", *args], capture_output=True,
                          text=True, timeout=timeout, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_submit_runs_a_command_as_a_ray_job_and_reports_its_failure(jobs_api, tmp_path,
                                                                   write_sim_store):
    store = write_sim_store(tmp_path / "sim")
    ok = _pertscale("submit", "--address", jobs_api, "--env", "PERTSCALE_TEST_ENV=1", "--",
                    "verify", store)
    assert ok.returncode == 0, ok.stderr[-3000:]
    job_id = re.search(r"submitted (\S+) to ", ok.stdout).group(1)
    assert f"python -m pertscale verify {store}" in ok.stdout
    assert f"job {job_id} succeeded" in ok.stdout
    assert f"ok: {store}" in ok.stdout  # verify's own output, from the job's logs

    bad = _pertscale("submit", "--address", jobs_api, "--", "verify", str(tmp_path / "absent"))
    assert bad.returncode == 1
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("pertscale submit: error: job ") and " failed: " in last
    assert str(tmp_path / "absent") in last


def test_submit_refuses_what_is_not_a_job_before_calling_the_cluster():
    not_a_command = _pertscale("submit", "--address", "http://127.0.0.1:9", "--", "quickstart")
    assert not_a_command.returncode == 2
    assert "'quickstart' is not a command a job can run" in not_a_command.stderr
    gcs_port = _pertscale("submit", "--address", "127.0.0.1:6379", "--", "info", "x")
    assert gcs_port.returncode == 2 and "http://HEAD:8265" in gcs_port.stderr
    unreachable = _pertscale("submit", "--address", "http://127.0.0.1:9", "--", "info", "x")
    assert unreachable.returncode == 1
    assert "Ray Jobs API at http://127.0.0.1:9 is not reachable" in unreachable.stderr
