"""scGen side of the perturbation-model benchmark: run as a script by another Python.

The reference scGen (PyPI `scgen` 2.1.0, April 2022) only works with the scvi-tools of its time
(0.15-0.19: it imports `scvi._compat`, `LossRecorder`, `AnnDataManager`), so the bench runs this
file with the interpreter of its own venv (`.venv-scgen`, pinned scvi-tools 0.17.4 /
pytorch-lightning 1.7.7 on CPU torch); it imports nothing from pertscale. It takes an h5ad whose
X is ALREADY log-normalised (no normalisation or gene selection happens here) and whose obs has a
cell-type and a condition column, holds out one cell type's stimulated cells and runs the scGen
tutorial's flow unchanged:

1. train = every cell except the held-out type's stimulated cells;
   `scgen.SCGEN.setup_anndata(train, batch_key=CONDITION, labels_key=CELL_TYPE)`;
2. `scgen.SCGEN(train)` with the default architecture (n_hidden=800, n_latent=100, n_layers=2,
   dropout 0.2, kl_weight 5e-5), then `train(max_epochs, batch_size, early_stopping=True,
   early_stopping_patience)`: scvi holds out 10% of `train` as validation (a permutation drawn
   from `scvi.settings.seed`) and stops on `elbo_validation` without restoring the best epoch's
   weights (the last epoch's are used); the model is left in eval mode;
3. `pred, delta = model.predict(ctrl_key, stim_key, celltype_to_predict=HELD_OUT)`, timed as
   `predict_s`. What scgen 2.1.0's predict (scgen/_scgen.py) does: it takes the control and the
   stimulated cells of the TRAINING AnnData, balances each with `balancer` (every cell type, the largest
   included, is resampled with replacement to the size of the largest type: the control side has
   all types, the stimulated side every type but the held-out one), subsamples both to the smaller of
   the two sizes without replacement, and takes delta = mean latent(stim) - mean latent(ctrl),
   latents being the encoder means. The held-out type's control cells are encoded, shifted by delta
   and decoded (decoder mean, no sampling): one predicted cell per control cell. All of that
   draws from numpy's global RNG (`np.random.choice`), so the prediction depends on the seed too.

Seeding: `scvi.settings.seed = SEED` (pytorch-lightning's seed_everything: random, numpy, torch;
the train/validation split), plus explicit random/numpy/torch seeds after scvi's import, which
itself seeds 0. stdout carries one JSON object: the genes, the per-gene mean of the predicted
stimulated cells of the held-out type (`pred_mean`), cell counts, epochs run, timings
(`time.perf_counter`), peak RSS and versions; library logs, warnings and progress bars go to
stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import resource
import sys
import time
from pathlib import Path

VERSIONED = ("scgen", "scvi-tools", "torch", "anndata", "pytorch-lightning")


def _fail(message: str) -> None:
    print(f"scgen_peer: error: {message}", file=sys.stderr)
    sys.exit(2)


def _log(message: str) -> None:
    print(f"scgen_peer: {message}", file=sys.stderr, flush=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_adata(args: argparse.Namespace):
    """The h5ad with checked obs columns and labels; obs columns as plain strings."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    if not args.h5ad.is_file():
        _fail(f"--h5ad {args.h5ad} does not exist")
    try:
        adata = ad.read_h5ad(args.h5ad)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        _fail(f"--h5ad {args.h5ad} cannot be read: {type(exc).__name__}: {exc}")
    for flag, key in (("--cell-type-key", args.cell_type_key),
                      ("--condition-key", args.condition_key)):
        if key not in adata.obs.columns:
            _fail(f"{flag} {key!r} is not an obs column of {args.h5ad}; "
                  f"found {list(adata.obs.columns)}")
    if args.cell_type_key == args.condition_key:
        _fail("--cell-type-key and --condition-key must differ")
    if args.control == args.stimulated:
        _fail("--control and --stimulated must differ")
    if adata.n_vars == 0 or adata.n_obs == 0:
        _fail(f"--h5ad {args.h5ad} is empty ({adata.n_obs} x {adata.n_vars})")
    if not adata.var_names.is_unique:
        _fail(f"--h5ad {args.h5ad}: var names are not unique, e.g. "
              f"{adata.var_names[adata.var_names.duplicated()].tolist()[:5]}")
    cell_type = adata.obs[args.cell_type_key].astype(str)
    condition = adata.obs[args.condition_key].astype(str)
    other = sorted(set(condition) - {args.control, args.stimulated})
    if other:
        _fail(f"--condition-key {args.condition_key!r} has labels other than --control "
              f"{args.control!r} and --stimulated {args.stimulated!r}: {other[:5]}")
    for flag, label in (("--control", args.control), ("--stimulated", args.stimulated)):
        if not (condition == label).any():
            _fail(f"{flag} {label!r} labels no cell in {args.condition_key!r}")
    held = cell_type == args.held_out
    if not held.any():
        _fail(f"--held-out {args.held_out!r} is not a cell type; "
              f"found {sorted(set(cell_type))}")
    if not (held & (condition == args.control)).any():
        _fail(f"--held-out {args.held_out!r} has no {args.control!r} cells to predict from")
    if not (~held & (condition == args.stimulated)).any():
        _fail(f"no {args.stimulated!r} cells outside --held-out {args.held_out!r} to learn from")
    adata.obs[args.cell_type_key] = cell_type.values
    adata.obs[args.condition_key] = condition.values
    x = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    if x.size and not np.isfinite(x).all():
        _fail(f"--h5ad {args.h5ad}: X has non-finite values")
    if x.size and np.all(x == np.round(x)) and x.max() > 20:
        _log("warning: X holds only integers up to "
             f"{x.max():g}: it looks like raw counts, not log-normalised data")
    return adata


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    adata = load_adata(args)  # checked before the slow scgen/scvi import
    t0 = time.perf_counter()
    import scgen
    import scvi

    _log(f"import scgen/scvi: {time.perf_counter() - t0:.1f}s")
    # importing scvi seeds everything with 0: seed after it
    scvi.settings.seed = args.seed
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    ct, cond = args.cell_type_key, args.condition_key
    held_stim = (adata.obs[ct] == args.held_out) & (adata.obs[cond] == args.stimulated)
    train = adata[~held_stim.values].copy()  # as the tutorial: drop only the held-out stim cells
    _log(f"training on {train.n_obs} cells x {train.n_vars} genes; "
         f"{int(held_stim.sum())} {args.stimulated!r} {args.held_out!r} cells held out")
    scgen.SCGEN.setup_anndata(train, batch_key=cond, labels_key=ct)
    model = scgen.SCGEN(train)
    t0 = time.perf_counter()
    model.train(max_epochs=args.max_epochs, batch_size=args.batch_size, early_stopping=True,
                early_stopping_patience=args.early_stopping_patience)
    train_s = time.perf_counter() - t0
    history = model.history  # scvi's logger: one row per epoch
    epochs_run = len(history["elbo_train"]) if "elbo_train" in history else \
        int(model.trainer.current_epoch)
    _log(f"trained {epochs_run} epoch(s) in {train_s:.1f}s")

    t0 = time.perf_counter()
    pred, _delta = model.predict(ctrl_key=args.control, stim_key=args.stimulated,
                                 celltype_to_predict=args.held_out)
    predict_s = time.perf_counter() - t0
    pred_x = pred.X.toarray() if hasattr(pred.X, "toarray") else np.asarray(pred.X)
    pred_mean = pred_x.astype(np.float64).mean(axis=0)
    if list(pred.var_names) != list(adata.var_names):
        _fail("scgen returned genes in another order than the input h5ad")
    return {"genes": [str(g) for g in adata.var_names], "held_out": args.held_out,
            "pred_mean": [float(v) for v in pred_mean], "n_pred_cells": int(pred.n_obs),
            "n_train_cells": int(train.n_obs),
            "n_validation_cells": len(model.validation_indices),
            "epochs_run": epochs_run, "train_s": train_s, "predict_s": predict_s,
            "peak_rss_mb": _peak_rss_mb(), "versions": _versions(), "seed": args.seed,
            "threads": args.threads, "max_epochs": args.max_epochs,
            "batch_size": args.batch_size,
            "early_stopping_patience": args.early_stopping_patience}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h5ad", type=Path, required=True, help="cells x genes, X log-normalised")
    p.add_argument("--cell-type-key", required=True, help="obs column of cell types")
    p.add_argument("--condition-key", required=True, help="obs column of conditions")
    p.add_argument("--control", required=True, help="control label in --condition-key")
    p.add_argument("--stimulated", required=True, help="stimulated label in --condition-key")
    p.add_argument("--held-out", required=True,
                   help="cell type whose stimulated cells are left out and predicted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--early-stopping-patience", type=int, default=25)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    for name, low in (("max_epochs", 1), ("batch_size", 2), ("early_stopping_patience", 1),
                      ("threads", 1), ("seed", 0)):
        if getattr(args, name) < low:
            _fail(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    # scvi's rich logger and pytorch-lightning print to stdout: keep stdout for the JSON
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
