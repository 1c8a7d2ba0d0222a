"""The quickstart pipeline: simulate -> ingest -> verify -> stats -> pretrain scGPT -> fit GenePert
on the supplied gene table -> fit GenePert on the pretrained scGPT's gene embeddings (lineage:
its parent is that scgpt version) -> evaluate both registered GenePerts beside the baselines, on
the embedded default (local Ray, SQLite MLflow under the storage root). Registered versions are
addressed by the aliases the steps set (scgpt@quickstart, genepert@table, genepert@scgpt_genes).

Each step runs the same `pertscale` command a user would type, so the quickstart exercises the
real command line end to end; a failing step stops the pipeline and is named in the error.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from pertscale.cli import run_command
from pertscale.config import Config, ConfigError, check_choice, load_config
from pertscale.data.synthetic import SimulatorConfig
from pertscale.paths import storage_root

__all__ = ["STEPS", "QuickstartConfig", "QuickstartError", "main", "run_quickstart"]

STEPS = ("simulate", "ingest", "verify", "stats", "pretrain", "genepert", "genepert_scgpt",
         "evaluate")
# aliases the steps register and evaluate by
SCGPT_URI = "models:/pertscale-scgpt@quickstart"
GENEPERT_URIS = ("models:/pertscale-genepert@table", "models:/pertscale-genepert@scgpt_genes")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _quickstart_simulation() -> SimulatorConfig:
    # Small enough for a laptop CPU in seconds; large enough that models beat the baselines.
    return SimulatorConfig(n_genes=500, n_cells=12000, n_single_perturbations=60,
                           n_double_perturbations=30)


@dataclasses.dataclass
class QuickstartConfig(Config):
    """The quickstart job (configs/quickstart.toml)."""

    workdir: str = ""
    """Folder for the simulated files and the store; "" = <storage root>/quickstart."""
    steps: list[str] = dataclasses.field(default_factory=lambda: list(STEPS))
    """Steps to run, in pipeline order (a subset of STEPS)."""
    simulate: SimulatorConfig = dataclasses.field(default_factory=_quickstart_simulation)
    """The simulated Perturb-seq screen."""
    hvg_top_genes: int = 200
    """Highly variable genes reported by the stats step (seurat_v3 on counts)."""
    pretrain_config: str = "configs/scgpt_debug.toml"
    """Pretraining job file; its store is the quickstart's."""
    pretrain_overrides: list[str] = dataclasses.field(default_factory=list)
    """Extra --section.field=value overrides for pretraining."""
    genepert_config: str = "configs/genepert.toml"
    """GenePert job file; store and embeddings are the quickstart's."""
    genepert_overrides: list[str] = dataclasses.field(default_factory=list)
    """Extra overrides for the GenePert fit."""
    evaluate_config: str = "configs/evaluate.toml"
    """Evaluation job file (evaluates the registered GenePert beside the baselines)."""
    evaluate_overrides: list[str] = dataclasses.field(default_factory=list)
    """Extra overrides for the evaluation."""

    def __post_init__(self) -> None:
        for step in self.steps:
            check_choice("steps[]", step, STEPS)
        if self.hvg_top_genes < 1:
            raise ConfigError(f"hvg_top_genes={self.hvg_top_genes} must be >= 1")


class QuickstartError(RuntimeError):
    """A pipeline step exited non-zero; the message names the step and its command line."""


def _config_path(path: str) -> str:
    """A job file relative to the working directory, else to the repository."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return str(p)
    return str(REPO_ROOT / p)


def _simulate_args(cfg: SimulatorConfig) -> list[str]:
    return [f"--{key}={value!r}" if isinstance(value, str) else f"--{key}={value}"
            for key, value in cfg.to_dict().items()]


def run_quickstart(cfg: QuickstartConfig) -> list[tuple[str, float, int]]:
    """Run the configured steps; returns (step, seconds, exit code) rows."""
    work = Path(cfg.workdir) if cfg.workdir else storage_root() / "quickstart"
    sim_dir, store = work / "simulated", work / "store"
    work.mkdir(parents=True, exist_ok=True)
    # step -> the `pertscale` command line it runs (command name first)
    commands = {
        "simulate": ["simulate", "--out", str(sim_dir), "--overwrite", "--quiet",
                     *_simulate_args(cfg.simulate)],
        "ingest": ["ingest", str(sim_dir / "cells.h5ad"), "--out", str(store), "--overwrite",
                   "--quiet"],
        "verify": ["verify", str(store)],
        "stats": ["stats", str(store), "--flavor", "seurat_v3",
                  "--n-top-genes", str(cfg.hvg_top_genes), "--out", str(work / "stats")],
        "pretrain": ["pretrain", "--config", _config_path(cfg.pretrain_config), "--no-progress",
                     f"--data.store_uri={store}", "--alias", "quickstart",
                     *cfg.pretrain_overrides],
        "genepert": ["fit", "genepert", "--config", _config_path(cfg.genepert_config),
                     f"--data.store_uri={store}", "--run_name=genepert-table",
                     f"--embeddings.path={sim_dir / 'gene_embeddings.npz'}", "--alias", "table",
                     *cfg.genepert_overrides],
        "genepert_scgpt": ["fit", "genepert", "--config", _config_path(cfg.genepert_config),
                           f"--data.store_uri={store}", "--run_name=genepert-scgpt-genes",
                           f"--init_from={SCGPT_URI}", "--alias", "scgpt_genes",
                           *cfg.genepert_overrides],
        "evaluate": ["evaluate", "--config", _config_path(cfg.evaluate_config),
                     f"--data.store_uri={store}",
                     "--models=[" + ",".join(f'"{u}"' for u in GENEPERT_URIS) + "]",
                     *cfg.evaluate_overrides],
    }
    rows = []
    for step in STEPS:
        if step not in cfg.steps:
            continue
        command, *argv = commands[step]
        print(f"\n=== quickstart: {step} ===", flush=True)
        start = time.perf_counter()
        rc = run_command(command, argv)
        rows.append((step, time.perf_counter() - start, rc))
        if rc != 0:
            raise QuickstartError(f"quickstart step {step!r} failed with exit code {rc} "
                               f"(command: pertscale {command} {' '.join(argv)})")
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pertscale quickstart", description=__doc__)
    parser.add_argument("--config", default=_config_path("configs/quickstart.toml"),
                        help="job file (job = \"quickstart\")")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides, job="quickstart")
    total = time.perf_counter()
    try:
        rows = run_quickstart(cfg)
    except QuickstartError as e:
        print(f"pertscale quickstart: {e}", file=sys.stderr)
        return 1
    print("\nquickstart summary")
    print(f"  {'step':<15} {'seconds':>8}  status")
    for step, seconds, rc in rows:
        print(f"  {step:<15} {seconds:>8.1f}  {'ok' if rc == 0 else f'exit {rc}'}")
    print(f"  {'total':<15} {time.perf_counter() - total:>8.1f}")
    print(f"  MLflow: {storage_root() / 'mlflow'} (mlflow ui --backend-store-uri "
          f"sqlite:///{storage_root() / 'mlflow' / 'mlflow.db'})")
    return 0
