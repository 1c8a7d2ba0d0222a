"""`pertscale` command line: an explicit subcommand table.

Each entry maps a subcommand to "module:function"; the function takes the remaining argv
(list of str) and returns an exit code. Modules are imported only when their command runs,
so `pertscale --help` stays fast and a command never pays for another's imports.
"""

from __future__ import annotations

import importlib
import sys

from pertscale.config import ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("pertscale.pipeline:main", "simulate, ingest, verify, pretrain, fit and evaluate on the embedded default"),
    "simulate": ("pertscale.data.synthetic_cli:main", "simulate a Perturb-seq dataset (h5ad or straight into a store)"),
    "ingest": ("pertscale.store.commands:ingest_main", "ingest .h5ad files into a cell store or collection"),
    "stats": ("pertscale.store.commands:stats_main", "size factors and highly variable genes from stored statistics"),
    "verify": ("pertscale.store.commands:verify_main", "check every shard of a store against its checksums"),
    "info": ("pertscale.store.commands:info_main", "print a store's metadata"),
    "pretrain": ("pertscale.training.commands:pretrain_main", "pretrain a model with DeepSpeed ZeRO on Ray Train"),
    "finetune": ("pertscale.training.finetune:finetune_main", "fine-tune a perturbation model (gears) on paired cells, register and evaluate it"),
    "fit": ("pertscale.eval.commands:fit_main", "fit a closed-form perturbation model (genepert) on the Ray cluster"),
    "evaluate": ("pertscale.eval.commands:evaluate_main", "evaluate models beside baselines and write a report"),
    "pull": ("pertscale.tracking.commands:pull_main", "fetch and verify a registered model (models:/NAME@ALIAS)"),
    "alias": ("pertscale.tracking.commands:alias_main", "point an alias at a registered version (models:/NAME/3 champion)"),
    "embed": ("pertscale.embedding:main", "per-cell latents and pathway activities of a registered model, with a pathway discrepancy table"),
    "predict": ("pertscale.predict:main", "predict expression for perturbations with a registered model, as .h5ad or .csv"),
    "bench": ("pertscale.bench:main", "benchmarks: ingest, loader, train"),
}


def resolve(target: str):
    """The function named by a "module:function" table entry (imported on first use)."""
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def run_command(name: str, argv: list[str]) -> int:
    """Run the subcommand `name` with `argv` as `pertscale name argv...` would."""
    return int(resolve(COMMANDS[name][0])(argv) or 0)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: pertscale <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pertscale: unknown command {name!r}; commands: {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return run_command(name, rest)
    except ConfigError as e:
        print(f"pertscale {name}: config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"pertscale {name}: error: {e}", file=sys.stderr)
        return 1
