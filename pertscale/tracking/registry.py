"""Model registry: every registered version is a real MLflow model (models-from-code pyfunc)
whose `pertscale` artifact folder holds the model as its spec exported it:

    model.safetensors   the tensors (no pickle anywhere)
    config.json         the spec name ("model"), its [model] section and what rebuilding needs
    vocab.json          the vocabulary (gene tokens, or the readout genes)
    manifest.json       sha256 of each file above, model name, pertscale version

The logged MLflow model (artifact `model/` of the run) is MLmodel + the code file
`pyfunc_model.py` + `artifacts/pertscale/`, with a signature; the manifest's own sha256 is also
the model-version tag `manifest_sha256`. Pulling verifies, before anything is loaded: the
manifest's keys equal the folder's files (a missing or an unlisted file is refused), every
file's sha256, and the manifest's sha256 against the tag. Nothing in a pulled model can turn on
pickle or name a file to open: models carry their tensors.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from pertscale import __version__
from pertscale.checksums import file_sha256
from pertscale.models.spec import Exported, get_spec
from pertscale.tracking.logger import (
    RunLogger,
    TrackingConfig,
    bound_mlflow_requests,
    resolve_tracking_uri,
    sqlite_path,
)

__all__ = [
    "MANIFEST",
    "MODEL_FILES",
    "PYFUNC_DIR",
    "PulledModel",
    "RegistryError",
    "check_alias",
    "code_version",
    "load_model_dir",
    "log_model",
    "parse_model_uri",
    "pull_model",
    "registered_name",
    "resolve_version",
    "save_mlflow_model",
    "save_model_dir",
    "set_alias",
]

MODEL_FILES = ("model.safetensors", "config.json", "vocab.json")
MANIFEST = "manifest.json"
PYFUNC_DIR = "artifacts/pertscale"  # the pertscale folder inside a logged MLflow model
_PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class RegistryError(ValueError):
    """A model URI that does not resolve, or a pulled model that fails verification."""


@dataclasses.dataclass
class PulledModel:
    uri: str
    name: str
    version: str
    exported: Exported
    tags: dict[str, str]
    path: Path
    """The verified pertscale folder."""

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.exported.tensors

    @property
    def config(self) -> dict[str, Any]:
        return self.exported.config

    @property
    def vocab(self) -> list[str]:
        return self.exported.vocab

    @property
    def kind(self) -> str:
        """The spec name (config.json "model")."""
        return str(self.exported.config.get("model"))

    def predictor(self) -> Any:
        """The model's predictor, built by its spec."""
        return get_spec(self.kind).load(self.exported)


def registered_name(model_name: str) -> str:
    return f"pertscale-{model_name}"


def code_version() -> str:
    """pertscale version plus the git commit of the working tree when there is one."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             check=False, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{__version__}+{rev}" if rev else __version__


def check_alias(alias: str) -> str:
    """An alias MLflow accepts and that cannot be read as a version ("latest" is reserved)."""
    if not _ALIAS.match(alias) or alias == "latest":
        raise RegistryError(f"alias {alias!r} must start with a letter and hold only letters, "
                            f"digits, '_' and '-' (at most 64); 'latest' is reserved")
    return alias


def save_model_dir(out_dir: Path, exported: Exported) -> Path:
    """Write the model files and their manifest into `out_dir` (created)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    # NOTE: safetensors refuses shared or non-contiguous storage; clone to own each tensor.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in exported.tensors.items()}
    save_file(tensors, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(
        json.dumps(exported.config, indent=2, sort_keys=True, default=str))
    (out_dir / "vocab.json").write_text(json.dumps(list(exported.vocab)))
    manifest = {"model_name": exported.config["model"], "pertscale_version": __version__,
                "files": {name: file_sha256(out_dir / name) for name in MODEL_FILES}}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out_dir


def load_model_dir(path: Path, *, manifest_sha256: str | None = None) -> Exported:
    """Read a model folder after verifying it (module docstring); `manifest_sha256`, when
    given, must be the manifest's own checksum (the model-version tag)."""
    from safetensors.torch import load_file

    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise RegistryError(f"{path} has no {MANIFEST}: not a pertscale model folder")
    if manifest_sha256 is not None and file_sha256(manifest_path) != manifest_sha256:
        raise RegistryError(f"{manifest_path} has sha256 {file_sha256(manifest_path)}; the "
                            f"registry's manifest_sha256 tag is {manifest_sha256}")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise RegistryError(f"{manifest_path} is not a valid manifest: {e}") from None
    present = {str(f.relative_to(path)) for f in path.rglob("*") if f.is_file()} - {MANIFEST}
    if set(files) != present or set(files) != set(MODEL_FILES):
        raise RegistryError(
            f"{manifest_path} lists {sorted(files)}; the folder holds {sorted(present)} and a "
            f"model has exactly {sorted(MODEL_FILES)}")
    for name, expected in files.items():
        actual = file_sha256(path / name)
        if actual != expected:
            raise RegistryError(f"model file {path / name} fails verification: sha256 "
                                f"{actual} != manifest {expected}")
    config = json.loads((path / "config.json").read_text())
    if not isinstance(config, dict) or "model" not in config:
        raise RegistryError(f"{path / 'config.json'} does not name its model ('model' key)")
    return Exported(tensors=load_file(str(path / "model.safetensors")), config=config,
                    vocab=json.loads((path / "vocab.json").read_text()))


def save_mlflow_model(out_dir: Path, exported: Exported) -> Path:
    """The MLflow model folder (MLmodel, code, signature, artifacts/pertscale/) of `exported`."""
    import mlflow.pyfunc

    from pertscale.tracking.pyfunc import signature_for

    spec = get_spec(exported.config["model"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_dir(Path(tmp) / "pertscale", exported)
        signature = signature_for(spec, spec.load(load_model_dir(folder)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "no input example" advice
            mlflow.pyfunc.save_model(
                str(out_dir), python_model=str(_PYFUNC_CODE), artifacts={"pertscale": str(folder)},
                signature=signature, pip_requirements=[f"pertscale=={__version__}"],
                metadata={"pertscale_model": spec.name})
    return out_dir


def log_model(logger: RunLogger, exported: Exported, tags: dict[str, Any] | None = None, *,
              aliases: tuple[str, ...] | list[str] = (), register: bool = True) -> str | None:
    """Log `exported` as the MLflow model `model/` of the logger's run and register a new
    version of `pertscale-<model>` with lineage `tags` (plus code_version and manifest_sha256)
    and `aliases` (MLflow reserves "latest": `models:/NAME@latest` means the newest version).
    Returns the version's models:/ URI, the runs:/ URI when not registering, or None when
    tracking is off."""
    for alias in aliases:
        check_alias(alias)
    if not logger.active:
        return None
    model_name = exported.config["model"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_mlflow_model(Path(tmp) / "model", exported)
        manifest_sha = file_sha256(folder / PYFUNC_DIR / MANIFEST)
        logger.log_artifact(folder, "model")
    tags = {"code_version": code_version(), "manifest_sha256": manifest_sha,
            "pertscale_model": model_name,
            **{k: str(v) for k, v in (tags or {}).items() if v is not None}}
    logger.set_tags({f"model.{k}": v for k, v in tags.items()})
    if not logger.active:
        return None
    if not register:
        return f"runs:/{logger.run_id}/model"
    name = registered_name(model_name)

    def _register() -> str:
        client = logger.client
        if client.search_registered_models(filter_string=f"name = '{name}'") == []:
            client.create_registered_model(name, description=f"pertscale {model_name} models")
        source = f"{client.get_run(logger.run_id).info.artifact_uri}/model"
        mv = client.create_model_version(name, source, run_id=logger.run_id, tags=tags)
        for alias in aliases:
            client.set_registered_model_alias(name, alias, mv.version)
        return f"models:/{name}/{mv.version}"

    return logger._call("register_model", _register)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    m = _URI.match(uri)
    if not m:
        raise RegistryError(
            f"model URI {uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")
    return m["name"], m["alias"], m["version"]


def _client(tracking: TrackingConfig | None, uri: str):
    """(MlflowClient, tracking URI) to read the registry for the model URI `uri`."""
    from mlflow import MlflowClient

    tracking_uri = resolve_tracking_uri(tracking or TrackingConfig())
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        # NOTE: MLflow's client would create an empty database there (a typo looks empty)
        raise RegistryError(f"{uri}: the tracking database {db} does not exist (tracking URI "
                            f"{tracking_uri}); check --tracking-uri / MLFLOW_TRACKING_URI")
    bound_mlflow_requests()
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri), tracking_uri


def resolve_version(uri: str, *, tracking: TrackingConfig | None = None):
    """(MlflowClient, ModelVersion, tracking URI) of a models:/ URI; fails loudly."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    client, tracking_uri = _client(tracking, uri)
    try:
        if alias == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise MlflowException(f"registered model {name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
        elif alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, version)
    except MlflowException as e:
        try:
            known = [m.name for m in client.search_registered_models()]
        except MlflowException:
            known = "(could not be listed)"
        raise RegistryError(f"{uri} does not resolve at {tracking_uri}: {e.message}; "
                            f"registered models: {known}") from None
    return client, mv, tracking_uri


def pull_model(uri: str, *, tracking: TrackingConfig | None = None,
               dst_dir: str | Path | None = None) -> PulledModel:
    """Fetch a registered model (models:/NAME@ALIAS, models:/NAME@latest for the newest version,
    or models:/NAME/VERSION) and verify it (module docstring).
    Unlike logging, pulling fails loudly: a job that asked for a model must not run without it."""
    import mlflow

    _, mv, tracking_uri = resolve_version(uri, tracking=tracking)
    tags = dict(mv.tags)
    if "manifest_sha256" not in tags:
        raise RegistryError(f"{uri} (version {mv.version}) has no manifest_sha256 tag: it was "
                            f"not registered by this pertscale; register it again")
    dst = Path(dst_dir) if dst_dir else Path(tempfile.mkdtemp(prefix="pertscale-pull-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst),
                                                     tracking_uri=tracking_uri))
    folder = local / PYFUNC_DIR
    exported = load_model_dir(folder, manifest_sha256=tags["manifest_sha256"])
    name, _, _ = parse_model_uri(uri)
    return PulledModel(uri=uri, name=name, version=str(mv.version), exported=exported,
                       tags=tags, path=folder)


def set_alias(uri: str, alias: str, *, tracking: TrackingConfig | None = None) -> str:
    """Point `alias` of the registered model at the version `uri` names; returns that
    version's models:/NAME/VERSION."""
    check_alias(alias)
    client, mv, _ = resolve_version(uri, tracking=tracking)
    client.set_registered_model_alias(mv.name, alias, mv.version)
    return f"models:/{mv.name}/{mv.version}"
