"""Model registry: log trained weights as safetensors with their config and gene vocabulary,
register them as `pertscale-<model>`, and pull them back with checksum verification.

An artifact folder `model/` holds:
    model.safetensors   the weights (no pickle anywhere)
    config.json         the model's config (plain values) and anything needed to rebuild it
    vocab.json          the gene vocabulary (list of tokens, specials first)
    manifest.json       sha256 of each file above, model name, pertscale version
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from pertscale import __version__
from pertscale.checksums import file_sha256
from pertscale.tracking.logger import RunLogger, TrackingConfig, resolve_tracking_uri

__all__ = [
    "PulledModel",
    "RegistryError",
    "code_version",
    "load_model_dir",
    "log_model",
    "parse_model_uri",
    "pull_model",
    "registered_name",
    "save_model_dir",
]

MODEL_FILES = ("model.safetensors", "config.json", "vocab.json")
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class RegistryError(ValueError):
    """A model URI that does not resolve, or a pulled model that fails verification."""


@dataclasses.dataclass
class PulledModel:
    uri: str
    name: str
    version: str
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    vocab: list[str]
    tags: dict[str, str]
    path: Path


def registered_name(model_name: str) -> str:
    return f"pertscale-{model_name}"


def code_version() -> str:
    """pertscale version plus the git commit of the working tree when there is one."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, check=False,
                             text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{__version__}+{rev}" if rev else __version__




def save_model_dir(out_dir: Path, model_name: str, state_dict: dict[str, torch.Tensor],
                   config: dict[str, Any], vocab: list[str]) -> Path:
    """Write the four model files into `out_dir` (created)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    # NOTE: safetensors refuses shared or non-contiguous storage; clone to own each tensor.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    (out_dir / "vocab.json").write_text(json.dumps(list(vocab)))
    manifest = {"model_name": model_name, "pertscale_version": __version__,
                "files": {name: file_sha256(out_dir / name) for name in MODEL_FILES}}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


def load_model_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """Read a model folder after checking every file against its manifest."""
    from safetensors.torch import load_file

    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise RegistryError(f"{path} has no manifest.json: not a pertscale model folder")
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise RegistryError(f"model file {file} is missing")
        actual = file_sha256(file)
        if actual != expected:
            raise RegistryError(
                f"model file {file} fails verification: sha256 {actual} != manifest {expected}")
    return (load_file(str(path / "model.safetensors")),
            json.loads((path / "config.json").read_text()),
            json.loads((path / "vocab.json").read_text()))


def log_model(logger: RunLogger, model_name: str, state_dict: dict[str, torch.Tensor],
              config: dict[str, Any], vocab: list[str], tags: dict[str, Any] | None = None,
              *, aliases: tuple[str, ...] = (), register: bool = True) -> str | None:
    """Log the model as artifacts of the logger's run and register a new version of
    `pertscale-<model_name>` with lineage `tags` and `aliases` (MLflow reserves "latest":
    `models:/NAME@latest` always means the newest version). Returns the version's
    models:/ URI, the runs:/ URI when not registering, or None when tracking is off."""
    if not logger.active:
        return None
    tags = {"code_version": code_version(), **{k: str(v) for k, v in (tags or {}).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_dir(Path(tmp) / "model", model_name, state_dict, config, vocab)
        logger.log_artifact(folder, "model")
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


def pull_model(uri: str, *, tracking: TrackingConfig | None = None,
               dst_dir: str | Path | None = None) -> PulledModel:
    """Fetch a registered model (models:/NAME@ALIAS, models:/NAME@latest for the newest version,
    or models:/NAME/VERSION) and verify it.
    Unlike logging, pulling fails loudly: a job that asked for a model must not run without it."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    tracking_uri = resolve_tracking_uri(tracking or TrackingConfig())
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
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
        known = [m.name for m in client.search_registered_models()]
        raise RegistryError(f"{uri} does not resolve at {tracking_uri}: {e.message}; "
                            f"registered models: {known}") from None
    dst = Path(dst_dir) if dst_dir else Path(tempfile.mkdtemp(prefix="pertscale-pull-"))
    local = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst),
                                                tracking_uri=tracking_uri)
    state_dict, config, vocab = load_model_dir(Path(local))
    return PulledModel(uri=uri, name=name, version=str(mv.version), state_dict=state_dict,
                       config=config, vocab=vocab, tags=dict(mv.tags), path=Path(local))
