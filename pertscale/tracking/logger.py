"""MLflow run logging that never stops training.

Only rank 0 (or the driver) creates a `RunLogger`. Every call catches its own failure, warns once
and turns the logger off: a tracking server that is down costs a warning, never a training run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlparse

from pertscale.config import Config, ConfigError, flatten_dict
from pertscale.paths import default_tracking_uri, storage_root

__all__ = ["RunLogger", "TrackingConfig", "check_tracking_uri", "resolve_tracking_uri",
           "sqlite_path"]

log = logging.getLogger(__name__)

# NOTE: one progress bar per downloaded file would land inside the commands' tables
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_MAX_PARAMS_PER_CALL = 100
_METRIC_NAME = re.compile(r"[^\w\-. :/]")
_MAX_PARAM_LEN = 6000


@dataclasses.dataclass
class TrackingConfig(Config):
    uri: str = ""
    """MLflow tracking URI; empty = env MLFLOW_TRACKING_URI, else sqlite under storage/mlflow."""
    experiment: str = "pertscale"
    """MLflow experiment name."""
    enabled: bool = True
    """Turn all tracking off (nothing is logged, nothing registered)."""
    register: bool = True
    """Register trained models as pertscale-<model> in the model registry."""
    aliases: list[str] = dataclasses.field(default_factory=list)
    """Aliases set on the registered version (models:/NAME@ALIAS); `--alias NAME` adds one."""


# MLflow's own defaults retry an unanswered request 7 times with exponential backoff, 120 s
# each: a black-holed server would hold a command for many minutes. A user's values win.
MLFLOW_REQUEST_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}


def bound_mlflow_requests() -> None:
    """Time limits on every MLflow server call of this process (environment, set once)."""
    for name, value in MLFLOW_REQUEST_LIMITS.items():
        if name not in os.environ:
            os.environ[name] = value
            log.info("MLflow requests: %s=%s (pertscale's default; set it to change)", name, value)


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or default_tracking_uri()


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// tracking URI (None for any other URI)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):])


def check_tracking_uri(cfg: TrackingConfig, address: str | None = None) -> None:
    """Before a job's work: a sqlite tracking URI in a folder that does not exist is a typo (MLflow
    would make the folder and an empty database there); a new database in an existing folder
    is said. A job on a running cluster (`address`) logs from a worker that may be on another
    node, so it needs a tracking server: a file or sqlite URI is refused."""
    if cfg.enabled and address:
        uri = resolve_tracking_uri(cfg)
        if urlparse(uri).scheme in ("", "file", "sqlite"):
            raise ConfigError(
                f"tracking URI {uri}: with --address {address}, rank 0 may run on another node, "
                f"where this file does not exist, and its metrics would be lost; start an MLflow "
                f"server (`mlflow server --backend-store-uri {uri} --host 0.0.0.0 --port 5000`) "
                f"and pass --tracking.uri=http://HOST:5000 (or set MLFLOW_TRACKING_URI)")
    db = sqlite_path(cfg.uri) if cfg.enabled else None
    if db is None or db.is_file():
        return
    if not db.parent.is_dir():
        raise ConfigError(f"tracking.uri={cfg.uri}: the folder {db.parent} does not exist; "
                          f"create it for a new database, or leave tracking.uri empty for "
                          f"the default under storage/mlflow")
    said = log.info if cfg.uri == default_tracking_uri() else log.warning  # ours: first run
    said("tracking.uri=%s: a new MLflow database is made at %s", cfg.uri, db)


def _server_reachable(uri: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


# NOTE: the MLflow UI (3.x) opens an experiment by its kind; ours train models, not GenAI apps
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND[0] not in exp.tags:  # made by an earlier pertscale, or by hand
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:") or "://" not in uri:
        # Embedded default: keep artifacts beside the database, under the storage root.
        artifact_location = (storage_root() / "mlflow" / "artifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=artifact_location,
                                    tags=dict([EXPERIMENT_KIND]))


class RunLogger:
    """One MLflow run. `run_id` attaches to a run created elsewhere (the driver creates the run,
    rank 0 of the workers logs into it); only a logger that created its run ends it."""

    def __init__(self, cfg: TrackingConfig, *, run_name: str = "", tags: dict[str, str] | None = None,
                 run_id: str | None = None):
        self.cfg = cfg
        # NOTE: resolving the default makes storage/mlflow; not for a run that tracks nothing
        self.uri = resolve_tracking_uri(cfg) if cfg.enabled else cfg.uri
        self.run_id: str | None = None
        self._client = None
        self._owns_run = run_id is None
        if not cfg.enabled:
            return
        if run_id is None:
            check_tracking_uri(cfg)
        if not _server_reachable(self.uri):
            self._disable(f"tracking server {self.uri} is unreachable")
            return
        try:
            from mlflow import MlflowClient

            bound_mlflow_requests()
            self._client = MlflowClient(tracking_uri=self.uri)
            if run_id is None:
                exp_id = _experiment_id(self._client, cfg.experiment, self.uri)
                run = self._client.create_run(exp_id, run_name=run_name or None, tags=tags or {})
                self.run_id = run.info.run_id
            else:
                self.run_id = self._client.get_run(run_id).info.run_id
        except Exception as e:  # noqa: BLE001 - any tracking failure is non-fatal by contract
            self._disable(f"could not start an MLflow run at {self.uri}: {e}")

    # -- state ---------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None

    @property
    def client(self):
        return self._client

    def _disable(self, why: str) -> None:
        message = f"MLflow tracking disabled: {why}; training goes on without it"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning(message)
        self._client = None

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._disable(f"{what} failed: {e}")
            return None

    # -- logging -------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_dict(params)
        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), _MAX_PARAMS_PER_CALL):
            self._call("log_params", self._client_call, "log_batch", self.run_id,
                       params=items[i:i + _MAX_PARAMS_PER_CALL])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # NOTE: MLflow refuses metric names with other characters (a cell type "CD14+ Mono").
        items = [Metric(_METRIC_NAME.sub("_", k), float(v), now, int(step or 0))
                 for k, v in metrics.items()]
        if items:
            self._call("log_metrics", self._client_call, "log_batch", self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._call("set_tag", self._client_call, "set_tag", self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        method = "log_artifacts" if path.is_dir() else "log_artifact"
        self._call(method, self._client_call, method, self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        self._call("log_dict", self._client_call, "log_dict", self.run_id, obj, name)

    def log_text(self, text: str, name: str) -> None:
        self._call("log_text", self._client_call, "log_text", self.run_id, text, name)

    def log_figure(self, fig, name: str) -> None:
        self._call("log_figure", self._client_call, "log_figure", self.run_id, fig, name)

    def _client_call(self, method: str, *args, **kwargs):
        return getattr(self._client, method)(*args, **kwargs)

    def end(self, status: str = "FINISHED") -> None:
        if self._owns_run:
            self._call("end_run", self._client_call, "set_terminated", self.run_id, status)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")
