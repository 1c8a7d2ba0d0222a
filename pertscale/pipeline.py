"""The quickstart pipeline, the whole mission on the embedded default (local Ray, SQLite MLflow
under the storage root, simulated data):

    simulate -> ingest -> verify -> stats -> pretrain scgpt and pathway_vae (2 Ray workers,
    ZeRO-2) -> fine-tune gears and scgpt_perturb (init_from the scgpt) and scgen (on the
    pathway_vae's encoder) -> fit genepert (on the supplied gene table and on the scgpt's gene
    embeddings) -> evaluate every registered model beside the baselines -> predict one unseen
    combination with gears.

Registered versions are addressed by the aliases the steps set (scgpt@quickstart, ...,
genepert@table, genepert@scgpt_genes); a child's lineage tags name its parent version. Each
step runs the same `pertscale` command a user would type, so the quickstart exercises the real
command line end to end; a failing step stops the pipeline and is named in the error. Every
step's header and training progress bar carry the pipeline's stage and elapsed time; the end
prints the step times, the evaluation tables, the registered models with their lineage and the
command that opens the MLflow UI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pertscale.cli import run_command
from pertscale.config import Config, ConfigError, check_choice, load_config
from pertscale.data.synthetic import SimulatorConfig
from pertscale.paths import storage_root

__all__ = ["STEPS", "QuickstartConfig", "QuickstartError", "main", "run_quickstart"]

STEPS = ("simulate", "ingest", "verify", "stats", "pretrain", "pretrain_pathway_vae",
         "finetune_gears", "finetune_scgpt_perturb", "finetune_scgen", "genepert",
         "genepert_scgpt", "evaluate", "evaluate_scgen", "predict")
# aliases the steps register and evaluate by
SCGPT_URI = "models:/pertscale-scgpt@quickstart"
PATHWAY_VAE_URI = "models:/pertscale-pathway_vae@quickstart"
GEARS_URI = "models:/pertscale-gears@quickstart"
SCGPT_PERTURB_URI = "models:/pertscale-scgpt_perturb@quickstart"
SCGEN_URI = "models:/pertscale-scgen@quickstart"
GENEPERT_URIS = ("models:/pertscale-genepert@table", "models:/pertscale-genepert@scgpt_genes")
REGISTERED = (SCGPT_URI, PATHWAY_VAE_URI, GEARS_URI, SCGPT_PERTURB_URI, SCGEN_URI,
              *GENEPERT_URIS)
# the job file of each training / evaluation step
JOB_FILES = {
    "pretrain": "configs/scgpt_debug.toml",
    "pretrain_pathway_vae": "configs/pathway_vae_debug.toml",
    "finetune_gears": "configs/gears_debug.toml",
    "finetune_scgpt_perturb": "configs/scgpt_perturb_debug.toml",
    "finetune_scgen": "configs/scgen_debug.toml",
    "genepert": "configs/genepert.toml",
    "genepert_scgpt": "configs/genepert.toml",
    "evaluate": "configs/evaluate.toml",
    "evaluate_scgen": "configs/evaluate.toml",
}
REPO_ROOT = Path(__file__).resolve().parents[1]


def _quickstart_simulation() -> SimulatorConfig:
    # Small enough for a laptop CPU in seconds; large enough that models beat the baselines.
    return SimulatorConfig(n_genes=500, n_cells=12000, n_single_perturbations=60,
                           n_double_perturbations=30)


def _default_overrides() -> dict[str, list[str]]:
    # as configs/quickstart.toml: short runs; the simulated screen perturbs one gene without GO
    # terms, which GEARS then gives no GO edges (reported in its run)
    return {"pretrain": ["--trainer.max_steps=120"],
            "finetune_gears": ["--priors.allow_missing_go=true"],
            "finetune_scgpt_perturb": ["--epochs=1"],
            "finetune_scgen": ["--model.prediction=change"]}


@dataclasses.dataclass
class QuickstartConfig(Config):
    """The quickstart job (configs/quickstart.toml)."""

    workdir: str = ""
    """Folder for the simulated files, the store and the prediction; "" = <storage root>/quickstart."""
    steps: list[str] = dataclasses.field(default_factory=lambda: list(STEPS))
    """Steps to run, in pipeline order (a subset of STEPS)."""
    simulate: SimulatorConfig = dataclasses.field(default_factory=_quickstart_simulation)
    """The simulated Perturb-seq screen."""
    hvg_top_genes: int = 200
    """Highly variable genes reported by the stats step (seurat_v3 on counts)."""
    configs: dict[str, str] = dataclasses.field(default_factory=dict)
    """Job file per step, where it differs from JOB_FILES (its store is the quickstart's)."""
    overrides: dict[str, list[str]] = dataclasses.field(default_factory=_default_overrides)
    """Extra --section.field=value arguments per step (replaces the defaults as a whole)."""
    heldout_cell_type: str = "cell_type_1"
    """The cell type whose perturbed cells scGen predicts from the other types."""

    def __post_init__(self) -> None:
        for step in self.steps:
            check_choice("steps[]", step, STEPS)
        if self.hvg_top_genes < 1:
            raise ConfigError(f"hvg_top_genes={self.hvg_top_genes} must be >= 1")
        for table, valid in (("configs", tuple(JOB_FILES)), ("overrides", STEPS)):
            unknown = [k for k in getattr(self, table) if k not in valid]
            if unknown:
                raise ConfigError(f"{table}.{unknown[0]} is not a step of the table; valid keys: "
                                  f"{list(valid)}")
        for step, args in self.overrides.items():
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise ConfigError(f"overrides.{step}={args!r} must be a list of strings")


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


def _models_arg(uris: tuple[str, ...]) -> str:
    return "--models=[" + ",".join(f'"{u}"' for u in uris) + "]"


def _commands(cfg: QuickstartConfig, work: Path) -> dict[str, list[str]]:
    """step -> the `pertscale` command line it runs (command name first)."""
    sim, store = work / "simulated", work / "store"

    def job(step: str) -> list[str]:
        return ["--config", _config_path(cfg.configs.get(step, JOB_FILES[step])),
                f"--data.store_uri={store}"]

    heldout = cfg.heldout_cell_type
    commands = {
        "simulate": ["simulate", "--out", str(sim), "--overwrite", "--quiet",
                     *_simulate_args(cfg.simulate)],
        "ingest": ["ingest", str(sim / "cells.h5ad"), "--out", str(store), "--overwrite",
                   "--quiet"],
        "verify": ["verify", str(store)],
        "stats": ["stats", str(store), "--flavor", "seurat_v3",
                  "--n-top-genes", str(cfg.hvg_top_genes), "--out", str(work / "stats")],
        "pretrain": ["pretrain", *job("pretrain"), "--alias", "quickstart"],
        "pretrain_pathway_vae": ["pretrain", *job("pretrain_pathway_vae"),
                                 f"--model.pathways.gmt={sim / 'gene_sets.gmt'}",
                                 f"--model.pathways.dag_edges={sim / 'go_dag_edges.tsv'}",
                                 "--alias", "quickstart"],
        "finetune_gears": ["finetune", *job("finetune_gears"),
                           f"--priors.go_path={sim / 'go_annotations.tsv'}",
                           f"--init_from={SCGPT_URI}", "--alias", "quickstart"],
        "finetune_scgpt_perturb": ["finetune", *job("finetune_scgpt_perturb"),
                                   f"--init_from={SCGPT_URI}", "--alias", "quickstart"],
        "finetune_scgen": ["finetune", *job("finetune_scgen"), "--model.encoder=pathway_vae",
                           f"--init_from={PATHWAY_VAE_URI}", f"--data.split.heldout={heldout}",
                           "--alias", "quickstart"],
        "genepert": ["fit", "genepert", *job("genepert"), "--run_name=genepert-table",
                     f"--embeddings.path={sim / 'gene_embeddings.npz'}", "--alias", "table"],
        "genepert_scgpt": ["fit", "genepert", *job("genepert_scgpt"),
                           "--run_name=genepert-scgpt-genes", f"--init_from={SCGPT_URI}",
                           "--alias", "scgpt_genes"],
        # the perturbation models on GEARS' simulation split (unseen singles and combinations)
        "evaluate": ["evaluate", *job("evaluate"), "--run_name=quickstart",
                     _models_arg((GEARS_URI, SCGPT_PERTURB_URI, *GENEPERT_URIS))],
        # scGen on its own question: a held-out cell type's response to known perturbations
        "evaluate_scgen": ["evaluate", *job("evaluate_scgen"), "--run_name=quickstart-scgen",
                           _models_arg((SCGEN_URI,)), "--data.split.kind=heldout_covariate",
                           f"--data.split.heldout={heldout}",
                           '--data.perturbation.sign_column=""',
                           "--data.perturbation.sign_values={}",
                           "--data.perturbation.n_de_genes=100",
                           '--report.metrics=["scgen","gears"]',
                           '--report.baselines=["no_change","train_mean","matching_mean"]'],
        "predict": ["predict", "--model", GEARS_URI, "--perturbations", "COMBINATION",
                    "--control", str(store), "--covariate-column", "cell_type",
                    "--out", str(work / "predicted.h5ad")],
    }
    for step, args in cfg.overrides.items():
        commands[step] = [*commands[step], *args]
    return commands


SEEN_GENES = {"combo_seen0": "two genes never perturbed in training",
              "combo_seen1": "one of its genes perturbed in training, the other not"}


def _unseen_combination() -> tuple[str, str]:
    """(a combination never seen in training, what was seen of its genes), from the split the
    evaluate step reported: GEARS' combo_seen0 if it has one, else combo_seen1."""
    reports = sorted(storage_root().glob("reports/quickstart-2*/split.json"),
                     key=lambda p: p.stat().st_mtime)
    if not reports:
        raise QuickstartError("the predict step needs the evaluate step's split (run steps "
                              "'evaluate' and 'predict' together)")
    test = json.loads(reports[-1].read_text())["test"]
    for group, seen in SEEN_GENES.items():
        if test.get(group):
            return test[group][0].split("/", 1)[1], seen
    raise QuickstartError(f"the split in {reports[-1]} has no unseen combination to predict")


def run_quickstart(cfg: QuickstartConfig, *, show: Callable[[str], None] = print,
                   ) -> list[tuple[str, float, int]]:
    """Run the configured steps; returns (step, seconds, exit code) rows."""
    from pertscale import progress

    work = Path(cfg.workdir) if cfg.workdir else storage_root() / "quickstart"
    work.mkdir(parents=True, exist_ok=True)
    commands = _commands(cfg, work)
    steps = [s for s in STEPS if s in cfg.steps]
    rows = []
    t0 = time.perf_counter()
    for k, step in enumerate(steps, 1):
        command, *argv = commands[step]
        stage = f"quickstart {k}/{len(steps)} {step}"
        progress.set_stage(stage, t0)
        show(f"\n=== [{stage} | {progress.elapsed(t0)} elapsed] pertscale {command} ===")
        if step == "predict":
            combo, seen = _unseen_combination()
            argv = [combo if a == "COMBINATION" else a for a in argv]
            show(f"{combo} ({seen}), predicted by {GEARS_URI}")
        start = time.perf_counter()
        try:
            rc = run_command(command, argv)
        finally:
            progress.set_stage("", None)
        rows.append((step, time.perf_counter() - start, rc))
        if rc != 0:
            raise QuickstartError(f"quickstart step {step!r} failed with exit code {rc} "
                                  f"(command: pertscale {command} {' '.join(argv)})")
    return rows


def _latest_report(pattern: str) -> Path | None:
    found = sorted(storage_root().glob(f"reports/{pattern}/metrics.csv"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _evaluation_tables() -> list[str]:
    """The evaluate steps' headline numbers: the perturbation models beside the baselines per
    GEARS subgroup (Pearson delta and MSE on the top-20 DE genes), and scGen's R^2 of means
    on the held-out cell type."""
    import pandas as pd

    lines = []
    path = _latest_report("quickstart-2*")
    if path is not None:
        table = pd.read_csv(path)
        table = table[table["subgroup"] != "val"]
        wide = table.pivot_table(index="model", columns="subgroup", sort=False,
                                 values=["pearson_delta_de", "mse_de"])
        groups = [g for g in ("unseen_single", "combo_seen0", "combo_seen1", "combo_seen2")
                  if ("pearson_delta_de", g) in wide.columns]
        lines += [("evaluation (GEARS simulation split; Pearson delta DE / MSE DE; "
                  f"report {path.parent})"),
                  f"  {'model':<24}" + "".join(f"{g:>22}" for g in groups)]
        def num(x: float) -> str:
            return "n/a" if pd.isna(x) else f"{x:.3f}"  # NaN: undefined (a constant prediction)

        for model, row in wide.iterrows():
            cells = "".join(f"{num(row[('pearson_delta_de', g)]):>12} / "
                            f"{num(row[('mse_de', g)]):<7}" for g in groups)
            lines.append(f"  {model:<24}{cells}")
    path = _latest_report("quickstart-scgen-*")
    if path is not None:
        table = pd.read_csv(path)
        lines += ["", (f"scGen, held-out cell type (R^2 of means, all / top-100 DE genes; "
                      f"report {path.parent})")]
        for row in table.itertuples():
            lines.append(f"  {row.model:<24}{row.r2_pearson_mean:>8.3f} / "
                         f"{row.r2_pearson_mean_de:.3f}")
    return lines


def _registered_models() -> list[str]:
    """The versions the quickstart registered (by the aliases it set), with their lineage."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pertscale.paths import default_tracking_uri

    client = MlflowClient(default_tracking_uri())
    lines = ["registered models (lineage: parent model, store fingerprint)"]
    for uri in REGISTERED:
        name, alias = uri[len("models:/"):].split("@")
        try:
            version = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            continue
        tags = version.tags
        parent = tags.get("init_from_version") or tags.get("init_from") or (
            f"table {Path(tags['features']).name}" if tags.get("features") else "-")
        store = tags.get("store_fingerprint", "-")[:12]
        versioned = f"models:/{name}/{version.version}"
        lines.append(f"  {versioned:<34} @{alias:<12} parent {parent:<34} store {store}")
    return lines


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
    import ray

    if ray.is_initialized():
        ray.shutdown()  # its workers' buffered log lines come out now, before the summary
    print("\nquickstart summary")
    print(f"  {'step':<24} {'seconds':>8}  status")
    for step, seconds, rc in rows:
        print(f"  {step:<24} {seconds:>8.1f}  {'ok' if rc == 0 else f'exit {rc}'}")
    print(f"  {'total':<24} {time.perf_counter() - total:>8.1f}\n")
    for line in [*_evaluation_tables(), "", *_registered_models()]:
        print(line)
    from pertscale.paths import default_tracking_uri

    print(f"\nMLflow UI: {sys.executable.rsplit('/', 1)[0]}/mlflow ui --backend-store-uri "
          f"{default_tracking_uri()} --port 5000   (then open http://127.0.0.1:5000)")
    return 0
