"""`pertscale pull models:/NAME@ALIAS`: fetch and verify a registered model."""

from __future__ import annotations

import argparse

from pertscale.tracking.logger import TrackingConfig
from pertscale.tracking.registry import pull_model


def pull_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pertscale pull", description=__doc__)
    parser.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--dst", default=None, help="folder to download into (default: a temp dir)")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or storage/mlflow)")
    args = parser.parse_args(argv)
    pulled = pull_model(args.uri, tracking=TrackingConfig(uri=args.tracking_uri), dst_dir=args.dst)
    n_params = sum(t.numel() for t in pulled.state_dict.values())
    print(f"pulled {pulled.name} version {pulled.version} ({args.uri})")
    print(f"  path:       {pulled.path}")
    print("  verified:   model.safetensors, config.json, vocab.json (sha256)")
    print(f"  tensors:    {len(pulled.state_dict)} ({n_params:,} parameters)")
    print(f"  vocab size: {len(pulled.vocab)}")
    for key, value in sorted(pulled.tags.items()):
        print(f"  tag {key}: {value}")
    return 0
