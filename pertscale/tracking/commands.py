"""Registry commands: `pertscale pull` (fetch and verify a registered model) and
`pertscale alias` (point an alias at a version); the `--alias` option of every command that
registers a model."""

from __future__ import annotations

import argparse
from typing import Any

from pertscale.tracking.logger import TrackingConfig
from pertscale.tracking.registry import MODEL_FILES, check_alias, pull_model, set_alias

__all__ = ["add_alias_argument", "alias_main", "pull_main", "with_aliases"]


def add_alias_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alias", action="append", default=[], metavar="NAME",
                        help="alias to set on the registered version (repeatable)")


def with_aliases(job: Any, aliases: list[str]) -> Any:
    """`job` with `aliases` added to its tracking.aliases (each checked)."""
    if not aliases:
        return job
    for alias in aliases:
        check_alias(alias)
    merged = list(dict.fromkeys([*job.tracking.aliases, *aliases]))
    return job.replace(tracking=job.tracking.replace(aliases=merged))


def _tracking_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or storage/mlflow)")


def pull_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pertscale pull",
                                     description="Fetch and verify a registered model.")
    parser.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--dst", default=None, help="folder to download into (default: a temp dir)")
    _tracking_argument(parser)
    args = parser.parse_args(argv)
    pulled = pull_model(args.uri, tracking=TrackingConfig(uri=args.tracking_uri), dst_dir=args.dst)
    n_params = sum(t.numel() for t in pulled.state_dict.values())
    print(f"pulled {pulled.name} version {pulled.version} ({args.uri}): a {pulled.kind} model")
    print(f"  path:       {pulled.path}")
    print(f"  verified:   {', '.join(MODEL_FILES)} (sha256), manifest (sha256 tag)")
    print(f"  tensors:    {len(pulled.state_dict)} ({n_params:,} values)")
    print(f"  vocab size: {len(pulled.vocab)}")
    for key, value in sorted(pulled.tags.items()):
        print(f"  tag {key}: {value}")
    return 0


def alias_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pertscale alias", description="Point an alias of a registered model at a version.")
    parser.add_argument("uri", help="the version: models:/NAME/VERSION (or @ALIAS, @latest)")
    parser.add_argument("alias", help="alias to set, e.g. champion")
    _tracking_argument(parser)
    args = parser.parse_args(argv)
    version = set_alias(args.uri, args.alias, tracking=TrackingConfig(uri=args.tracking_uri))
    name = version.split("/")[1]
    print(f"models:/{name}@{args.alias} -> {version}")
    return 0
