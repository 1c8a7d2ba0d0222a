"""MLflow tracking (rank 0, never fatal) and the model registry (log, register, alias, pull)."""

from pertscale.tracking.logger import (
    RunLogger,
    TrackingConfig,
    check_tracking_uri,
    resolve_tracking_uri,
)
from pertscale.tracking.registry import (
    PulledModel,
    RegistryError,
    code_version,
    load_model_dir,
    log_model,
    parse_model_uri,
    pull_model,
    registered_name,
    save_mlflow_model,
    save_model_dir,
    set_alias,
)

__all__ = [
    "PulledModel",
    "RegistryError",
    "RunLogger",
    "TrackingConfig",
    "check_tracking_uri",
    "code_version",
    "load_model_dir",
    "log_model",
    "parse_model_uri",
    "pull_model",
    "registered_name",
    "resolve_tracking_uri",
    "save_mlflow_model",
    "save_model_dir",
    "set_alias",
]
