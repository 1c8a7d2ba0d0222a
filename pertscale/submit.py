"""`pertscale submit`: run a pertscale command on a running Ray cluster through the Ray Jobs API.

    pertscale submit --address http://HEAD:8265 [--working-dir DIR] [--env NAME=VALUE ...]
                     [--no-wait] -- pretrain --config configs/scgpt_small.toml \
                     --data.store_uri=s3://bucket/store --trainer.storage_path=s3://bucket/runs

The command becomes the job's entrypoint, `python -m pertscale COMMAND ARGS...`, run by the
cluster's head node; a training, fit or evaluate command without `--address` gets
`--address=auto`, so its driver joins the cluster it runs on. The cluster's nodes must have
pertscale installed (the image, or `--working-dir .` to ship this checkout); stores and run
storage are reached by URI, and `--env` sets the job's environment (MLFLOW_TRACKING_URI of a
tracking server, AWS_* for s3://), since a job given an address refuses a sqlite tracking
URI. By default the command waits for the job, prints its logs and exits 0 only when it
succeeded; `--no-wait` prints the job id and returns. Every call to the Jobs API has
PERTSCALE_RAY_TIMEOUT_S (default 30 s) as its time limit.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
import urllib.request
from typing import Any

from pertscale.cluster import RAY_TIMEOUT_ENV
from pertscale.config import ConfigError, env_seconds

__all__ = ["entrypoint", "main"]

log = logging.getLogger(__name__)

# commands whose driver starts an embedded cluster unless given one
CLUSTER_COMMANDS = ("pretrain", "finetune", "fit", "evaluate")


def entrypoint(command: list[str]) -> str:
    """The job's shell entrypoint for `pertscale COMMAND ARGS...` (see the module doc)."""
    from pertscale.cli import COMMANDS

    if not command:
        raise ConfigError("give the command to run after `--`, e.g. "
                          "`-- pretrain --config configs/scgpt_small.toml`")
    name, *args = command
    if name not in COMMANDS or name in ("submit", "quickstart"):
        valid = [c for c in COMMANDS if c not in ("submit", "quickstart")]
        raise ConfigError(f"{name!r} is not a command a job can run; "
                          f"one of {valid}")
    has_address = any(a == "--address" or a.startswith("--address=") for a in args)
    if name in CLUSTER_COMMANDS and not has_address:
        args = [*args, "--address=auto"]
    return shlex.join(["python", "-m", "pertscale", name, *args])


def _client(address: str, limit: float):
    """A JobSubmissionClient whose every request has `limit` seconds (Ray's has none)."""
    from ray.job_submission import JobSubmissionClient

    class _Bounded(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kwargs: Any):
            kwargs.setdefault("timeout", limit)
            return super()._do_request(method, endpoint, **kwargs)

    return _Bounded(address)


def _check_dashboard(address: str, limit: float) -> None:
    """The Jobs API answers at `address` within the limit (the client itself would wait)."""
    url = address.rstrip("/") + "/api/version"
    try:
        with urllib.request.urlopen(url, timeout=limit) as r:
            r.read()
    except OSError as e:  # URLError too
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"Ray Jobs API at {address} is not reachable within {limit:g} s "
                              f"({reason}; {RAY_TIMEOUT_ENV} sets the limit); give the head's "
                              f"dashboard address, http://HEAD:8265") from None


def _env_vars(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--env {pair!r}: give NAME=VALUE")
        out[name] = value
    return out


def main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        ours, command = argv[:split], argv[split + 1:]
    else:
        ours, command = argv, []
    parser = argparse.ArgumentParser(prog="pertscale submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True,
                        help="the Ray Jobs API (dashboard) of the cluster, http://HEAD:8265")
    parser.add_argument("--working-dir", default="",
                        help="a folder shipped to the cluster as the job's working directory")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the job (repeat)")
    parser.add_argument("--no-wait", action="store_true",
                        help="print the job id and return without waiting for the job")
    args = parser.parse_args(ours)
    if not args.address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {args.address}: the Jobs API is an http(s) address, "
                          "http://HEAD:8265 (the dashboard port), not the GCS port")
    job_entry = entrypoint(command)
    env = _env_vars(args.env)
    runtime_env: dict[str, Any] = {"env_vars": env} if env else {}
    if args.working_dir:
        runtime_env["working_dir"] = args.working_dir
    limit = env_seconds(RAY_TIMEOUT_ENV, 30.0)
    _check_dashboard(args.address, limit)
    client = _client(args.address, limit)
    job_id = client.submit_job(entrypoint=job_entry, runtime_env=runtime_env or None)
    print(f"submitted {job_id} to {args.address}: {job_entry}", flush=True)
    if env:
        log.info("job environment: %s", ", ".join(sorted(env)))  # names only: values may be secrets
    if args.no_wait:
        return 0
    return _wait(client, job_id)


def _wait(client: Any, job_id: str, poll_s: float = 2.0) -> int:
    """Follow the job to its end; print its logs; 0 when it succeeded."""
    from ray.job_submission import JobStatus

    status = client.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(poll_s)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    sys.stdout.write(logs)
    if status == JobStatus.SUCCEEDED:
        print(f"job {job_id} succeeded")
        return 0
    last = next((line for line in reversed(logs.splitlines()) if line.strip()), "")
    detail = last or (client.get_job_info(job_id).message or "")
    print(f"pertscale submit: error: job {job_id} {status.value.lower()}: {detail.strip()}",
          file=sys.stderr)
    return 1
