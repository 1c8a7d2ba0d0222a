"""`pertscale` command line: an explicit subcommand table.

Each entry maps a subcommand to "module:function"; the function takes the remaining argv
(list of str) and returns an exit code. Modules are imported only when their command runs,
so `pertscale --help` stays fast and a command never pays for another's imports.
"""

from __future__ import annotations

import importlib
import os
import sys

from pertscale.config import ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("pertscale.pipeline:main", "simulate, ingest, verify, pretrain, fit and evaluate on the embedded default"),
    "simulate": ("pertscale.data.synthetic_cli:main", "simulate a Perturb-seq dataset (h5ad or straight into a store)"),
    "ingest": ("pertscale.store.commands:ingest_main", "ingest .h5ad files into a cell store or collection"),
    "stats": ("pertscale.store.commands:stats_main", "size factors and highly variable genes from stored statistics"),
    "verify": ("pertscale.store.commands:verify_main", "check every shard of a store against its checksums"),
    "info": ("pertscale.store.commands:info_main", "print a store's metadata"),
    "migrate": ("pertscale.store.commands:migrate_main", "rewrite a format-v1 store as format v2 (AnnData-compatible), X not recompressed"),
    "export": ("pertscale.store.export:export_main", "write cells of a store (a subset) as .h5ad, in bounded memory"),
    "pretrain": ("pertscale.training.commands:pretrain_main", "pretrain a model with DeepSpeed ZeRO on Ray Train"),
    "finetune": ("pertscale.training.finetune:finetune_main", "fine-tune a perturbation model (gears) on paired cells, register and evaluate it"),
    "fit": ("pertscale.eval.commands:fit_main", "fit a closed-form perturbation model (genepert) on the Ray cluster"),
    "evaluate": ("pertscale.eval.commands:evaluate_main", "evaluate models beside baselines and write a report"),
    "pull": ("pertscale.tracking.commands:pull_main", "fetch and verify a registered model (models:/NAME@ALIAS)"),
    "alias": ("pertscale.tracking.commands:alias_main", "point an alias at a registered version (models:/NAME/3 champion)"),
    "embed": ("pertscale.embedding:main", "per-cell latents and pathway activities of a registered model, with a pathway discrepancy table"),
    "predict": ("pertscale.predict:main", "predict expression for perturbations with a registered model, as .h5ad or .csv"),
    "submit": ("pertscale.submit:main", "run a pertscale command on a running Ray cluster as a Ray job (Jobs API)"),
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
    lines = ["usage: pertscale [--debug] <command> [args]", "",
             ("Expected failures (bad input, files, endpoints) end in one line on stderr; "
              "--debug (or PERTSCALE_DEBUG=1) shows their traceback."), "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("PERTSCALE_DEBUG", "") not in ("", "0")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pertscale: unknown command {name!r}; commands: {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return run_command(name, rest)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"pertscale {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # expected failures become one line, bugs re-raise
        if isinstance(e.__context__, KeyboardInterrupt) and not debug:
            # NOTE: Ctrl-C during a C extension's import surfaces as "ImportError:
            # initialization failed"
            print(f"pertscale {name}: interrupted", file=sys.stderr)
            return 130
        kind = expected_failure(e)
        if kind is None or debug:
            raise
        print(f"pertscale {name}: {kind}: {one_line(e)}", file=sys.stderr)
        return 2 if kind == "config error" else 1


def expected_failure(e: BaseException) -> str | None:
    """"config error" or "error" for a failure the user can act on (bad config or input, a
    file, a network endpoint), None for a bug (its traceback is kept)."""
    e = _cause(e)
    if isinstance(e, ConfigError):
        return "config error"
    if isinstance(e, (ValueError, OSError, TimeoutError)):  # OSError: files, connections
        return "error"
    if any(c.__name__ == "MlflowException" for c in type(e).__mro__):  # mlflow not imported here
        return "error"
    return None


def one_line(e: BaseException) -> str:
    """The failure in one line: an OSError as 'path: reason' (not '[Errno 13] ...'), a Ray task's
    error as its cause's message, and a multi-line message joined."""
    e = _cause(e)
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _cause(e: BaseException) -> BaseException:
    """The exception a Ray task raised (RayTaskError wraps it), else `e`."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e
