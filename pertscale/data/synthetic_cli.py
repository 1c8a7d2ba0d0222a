"""`pertscale simulate`: write a simulated Perturb-seq dataset (files, or cells into a store).

    pertscale simulate --out sim/                   # defaults = configs/simulate.toml
    pertscale simulate --config configs/simulate.toml --out sim/ --n_genes=2000 --seed=3
    pertscale simulate --store storage/stores/sim1m --n-cells 1000000 --n_genes=2000 [--out sim1m/]

Any `--field=value` (or `--field value`) sets a SimulatorConfig field; a field name may use
dashes for its underscores (`--n-cells` = `--n_cells`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from pertscale.config import apply_overrides, config_from_dict, load_config, parse_overrides
from pertscale.data.synthetic import CHUNK_CELLS, SimulatorConfig, write_dataset
from pertscale.memory import peak_rss_mb

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    fields = ", ".join(f.name for f in dataclasses.fields(SimulatorConfig))
    p = argparse.ArgumentParser(
        prog="pertscale simulate", allow_abbrev=False,
        description="Simulate a Perturb-seq screen with known ground truth.",
        epilog=f"Config fields (set with --field=value): {fields}")
    p.add_argument("--config", help="TOML file with job = \"simulate\" (default: built-in "
                   "defaults, the same as configs/simulate.toml)")
    p.add_argument("--out", help="directory for cells.h5ad, GO tables, gene sets, embeddings, "
                   "truth and manifest.json")
    p.add_argument("--store", help="write the cells into a cell store at this URI instead of "
                   "cells.h5ad")
    p.add_argument("--block-size", type=int, default=4 * CHUNK_CELLS,
                   help="cells per written block (memory scales with it; default %(default)s)")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                   help="threads drawing cells (same data for any value; default %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory / complete store")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _load(config: str | None, rest: list[str]) -> SimulatorConfig:
    overrides = {key.replace("-", "_"): value for key, value in parse_overrides(rest).items()}
    if config:
        return load_config(config, overrides, job="simulate")
    return config_from_dict(SimulatorConfig, apply_overrides({}, overrides))


def main(argv: list[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    cfg = _load(args.config, rest)
    if args.threads < 1 or args.block_size < 1:
        parser.error("--threads and --block-size must be positive")
    if not args.out and not args.store:
        parser.error("give --out DIR and/or --store URI")
    t0 = time.perf_counter()
    next_report = [0.0]

    def progress(done: int) -> None:
        now = time.perf_counter() - t0
        if not args.quiet and (now >= next_report[0] or done == cfg.n_cells):
            next_report[0] = now + 10.0
            print(f"  {done:>10,d} / {cfg.n_cells:,d} cells  {done / max(now, 1e-9):,.0f} cells/s",
                  file=sys.stderr, flush=True)

    manifest = write_dataset(cfg, args.out, block_size=args.block_size, store_uri=args.store,
                             overwrite=args.overwrite, progress=progress,
                             num_threads=args.threads)
    seconds = time.perf_counter() - t0
    peak_rss_mib = peak_rss_mb()
    summary = {
        "n_cells": manifest["n_cells"], "n_genes": manifest["n_genes"], "nnz": manifest["nnz"],
        "nonzero_fraction": round(manifest["nnz"] / (manifest["n_cells"] * manifest["n_genes"]), 4),
        "n_conditions": manifest["n_conditions"], "seed": cfg.seed,
        "threads": args.threads, "seconds": round(seconds, 2),
        "cells_per_s": round(manifest["n_cells"] / seconds, 1),
        "peak_rss_mib": round(peak_rss_mib, 1), "out": args.out, "store": args.store,
    }
    print(json.dumps(summary, indent=2))
    return 0
