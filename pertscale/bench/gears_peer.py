"""GEARS side of the perturbation-model benchmark: run as a script by another Python.

GEARS (cell-gears 0.1.2, module `gears`) pins its own torch / torch_geometric stack, so the bench
runs this file with the interpreter of a venv that has it installed; it imports nothing from
pertscale. It takes an h5ad whose obs `condition` is in GEARS' naming ("ctrl", "A+ctrl", "A+B"),
a GO table (TSV, optionally gzipped, columns `symbol` or `gene_symbol` and `go_id`) and a split
JSON ({"train": [...], "val": [...], "test": [...]} of condition names), then:

1. writes the files GEARS would otherwise download from dataverse, built from our GO table:
   `gene2go_all.pkl` (symbol -> set of GO ids, read by `PertData.__init__` and `make_GO`) and a
   perturbable-gene pickle passed as `gene_set_path` (measured genes plus perturbed genes, the
   set GEARS itself uses with `default_pert_graph=False`); with `gene_set_path` GEARS builds its
   GO graph with `make_GO` (Jaccard > 0.1) instead of downloading `go_essential_all.csv`;
2. runs GEARS' own processing (`new_data_process`: DE genes plus one pickled PyG graph per cell),
   timed as `process_s`, its custom split and dataloaders;
3. trains `GEARS.model_initialize(hidden_size=...)` with every other setting at its default. The
   epoch loop is the body of `GEARS.train` (gears.py:499-575) copied with GEARS' own objects, so
   the batch loop (`epoch_train_s`) is timed apart from GEARS' per-epoch train/val evaluation
   (`epoch_eval_s`); the best model is kept by val top-20 DE MSE, as GEARS does;
4. predicts the mean expression of every val and test condition with `GEARS.predict`,
and prints one JSON object on stdout (GEARS' own prints and all logs go to stderr). The script
re-executes itself with PYTHONHASHSEED=SEED: GEARS' loss sums over a set of condition names.
Conditions with a gene outside the GO table cannot be predicted by GEARS; they are dropped from
the data and the split (GEARS' `PertData.load` drops them the same way) and listed in the output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import random
import resource
import shutil
import sys
import time
from pathlib import Path

DATASET = "peer"  # GEARS lower-cases dataset names; its files go under WORKDIR/peer
GO_SYMBOL_COLUMNS = ("symbol", "gene_symbol")


def _fail(message: str) -> None:
    print(f"gears_peer: error: {message}", file=sys.stderr)
    sys.exit(2)


def _log(message: str) -> None:
    print(f"gears_peer: {message}", file=sys.stderr, flush=True)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited via exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _genes_of(condition: str) -> list[str]:
    return [g for g in condition.split("+") if g != "ctrl"]


def load_gene2go(path: Path) -> dict[str, set[str]]:
    """GEARS' gene2go dict (symbol -> set of GO ids) from our GO table."""
    import pandas as pd

    if not path.is_file():
        _fail(f"--go {path} does not exist")
    table = pd.read_csv(path, sep="\t", dtype=str)
    symbol = next((c for c in GO_SYMBOL_COLUMNS if c in table.columns), None)
    if symbol is None or "go_id" not in table.columns:
        _fail(f"--go {path} needs a gene column ({' or '.join(GO_SYMBOL_COLUMNS)}) and 'go_id'; "
              f"found {list(table.columns)}")
    table = table[[symbol, "go_id"]].dropna().drop_duplicates()
    gene2go = {g: set(ids) for g, ids in table.groupby(symbol)["go_id"]}
    if not gene2go:
        _fail(f"--go {path} has no (gene, go_id) rows")
    return gene2go


def load_split(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        _fail(f"--split {path} does not exist")
    split = json.loads(path.read_text())
    if not isinstance(split, dict) or any(not isinstance(split.get(k), list)
                                          for k in ("train", "val", "test")):
        _fail(f"--split {path} must be a JSON object with lists 'train', 'val' and 'test'")
    return {k: [str(c) for c in split[k]] for k in ("train", "val", "test")}


def load_adata(path: Path):
    """The h5ad as GEARS needs it: CSR float32 X (GEARS calls X.toarray()), checked columns."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    if not path.is_file():
        _fail(f"--h5ad {path} does not exist")
    adata = ad.read_h5ad(path)
    for frame, cols in (("obs", ("condition", "cell_type")), ("var", ("gene_name",))):
        missing = [c for c in cols if c not in getattr(adata, frame).columns]
        if missing:
            _fail(f"--h5ad {path}: {frame} lacks column(s) {missing}")
    conditions = adata.obs["condition"].astype(str)
    bad = sorted({c for c in conditions.unique() if c != "ctrl" and len(c.split("+")) != 2})
    if bad:
        _fail(f"--h5ad {path}: conditions must be 'ctrl', 'A+ctrl' or 'A+B'; got {bad[:5]}")
    no_ctrl = sorted(set(adata.obs["cell_type"].astype(str))
                     - set(adata.obs["cell_type"].astype(str)[conditions == "ctrl"]))
    if no_ctrl:  # GEARS ranks DE genes per cell type against that cell type's controls
        _fail(f"--h5ad {path}: no 'ctrl' cells for cell type(s) {no_ctrl[:5]}")
    if adata.var["gene_name"].duplicated().any():
        _fail(f"--h5ad {path}: var gene_name has duplicates, e.g. "
              f"{adata.var['gene_name'][adata.var['gene_name'].duplicated()].tolist()[:5]}")
    adata.obs["condition"] = conditions.values
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).values
    adata.var["gene_name"] = adata.var["gene_name"].astype(str).values
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def _pandas_mask_csr(x):
    """CSR whose row indexing takes a pandas boolean Series (gears.py:87 indexes X with one)."""
    import pandas as pd
    import scipy.sparse as sp

    # NOTE: recent scipy (1.17 here) takes a Series as a bool array and calls Series.nonzero,
    # which pandas removed; a numpy mask restores the behaviour GEARS 0.1.2 was written for
    class PandasMaskCSR(sp.csr_matrix):
        def __getitem__(self, key):
            if isinstance(key, (pd.Series, pd.Index)):
                key = key.to_numpy()
            return super().__getitem__(key)

    return PandasMaskCSR(x)


def check_split(split: dict[str, list[str]], present: set[str], dropped: set[str]) -> dict:
    """Split restricted to conditions GEARS can use; an unknown or shared condition is an error."""
    split = {k: [c for c in v if c not in dropped] for k, v in split.items()}
    seen: dict[str, str] = {}
    for name, conds in split.items():
        for c in conds:
            if c in seen and seen[c] != name:
                _fail(f"--split: condition {c!r} is in both {seen[c]!r} and {name!r}")
            seen[c] = name
    unknown = sorted(set(seen) - present)
    if unknown:
        _fail(f"--split: {len(unknown)} condition(s) not in the h5ad, e.g. {unknown[:5]}")
    if "ctrl" in split["val"] or "ctrl" in split["test"]:
        _fail("--split: 'ctrl' belongs to 'train' (GEARS pairs every perturbed cell with controls)")
    if "ctrl" not in split["train"]:
        _log("adding 'ctrl' to the train split, as GEARS' own splitters do")
        split["train"].append("ctrl")
    if len(split["train"]) < 2 or not split["val"]:
        _fail("--split: 'train' needs perturbed conditions and 'val' at least one condition")
    return split


def _train(gears_model, epochs: int) -> tuple[list[float], list[float]]:
    """The epoch loop of `GEARS.train` (gears.py:499-575), timing the batch loop on its own."""
    from copy import deepcopy

    import numpy as np
    from gears.inference import compute_metrics, evaluate
    from gears.utils import loss_fct, print_sys
    from torch import nn, optim
    from torch.optim.lr_scheduler import StepLR

    assert not gears_model.config["uncertainty"], "defaults train without the uncertainty head"
    train_loader = gears_model.dataloader["train_loader"]
    val_loader = gears_model.dataloader["val_loader"]
    model, device = gears_model.model.to(gears_model.device), gears_model.device
    best_model = deepcopy(model)
    optimizer = optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    scheduler = StepLR(optimizer, step_size=1, gamma=0.5)
    min_val = np.inf
    train_s, eval_s = [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for step, batch in enumerate(train_loader):
            batch.to(device)
            optimizer.zero_grad()
            pred = model(batch)
            loss = loss_fct(pred, batch.y, batch.pert, ctrl=gears_model.ctrl_expression,
                            dict_filter=gears_model.dict_filter,
                            direction_lambda=gears_model.config["direction_lambda"])
            loss.backward()
            nn.utils.clip_grad_value_(model.parameters(), clip_value=1.0)
            optimizer.step()
            if step % 50 == 0:
                print_sys(f"Epoch {epoch + 1} Step {step + 1} Train Loss: {loss.item():.4f}")
        scheduler.step()
        t1 = time.perf_counter()
        train_metrics, _ = compute_metrics(evaluate(train_loader, model, False, device))
        val_metrics, _ = compute_metrics(evaluate(val_loader, model, False, device))
        print_sys(f"Epoch {epoch + 1}: Train Overall MSE: {train_metrics['mse']:.4f} "
                  f"Validation Overall MSE: {val_metrics['mse']:.4f}. Validation Top 20 DE MSE: "
                  f"{val_metrics['mse_de']:.4f}")
        if val_metrics["mse_de"] < min_val:
            min_val = val_metrics["mse_de"]
            best_model = deepcopy(model)
        train_s.append(t1 - t0)
        eval_s.append(time.perf_counter() - t1)
    gears_model.best_model = best_model
    return train_s, eval_s


def run(args: argparse.Namespace) -> dict:
    from importlib.metadata import version

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from gears import GEARS, PertData
    from gears.utils import make_GO

    # gears.gears calls torch.manual_seed(0) on import: seed after it
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    gene2go = load_gene2go(args.go)
    split = load_split(args.split)
    adata = load_adata(args.h5ad)

    # NOTE: make_GO reads and writes './data/go_essential_<name>.csv' relative to the working
    # directory, and GEARS reuses any cached co-expression csv: work inside WORKDIR, clear caches.
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    shutil.rmtree(workdir / DATASET, ignore_errors=True)
    (workdir / "data").mkdir(exist_ok=True)
    (workdir / "data" / f"go_essential_{DATASET}.csv").unlink(missing_ok=True)

    conditions = set(adata.obs["condition"].unique())
    pert_genes = sorted(set(adata.var["gene_name"]) | {g for c in conditions for g in _genes_of(c)})
    with open(workdir / "gene2go_all.pkl", "wb") as f:
        pickle.dump(gene2go, f)
    gene_set_path = workdir / "pert_genes.pkl"
    with open(gene_set_path, "wb") as f:
        pickle.dump(pert_genes, f)
    dropped = sorted(c for c in conditions if any(g not in gene2go for g in _genes_of(c)))
    if dropped:
        _log(f"dropping {len(dropped)} condition(s) with a gene outside the GO table: {dropped}")
        adata = adata[~adata.obs["condition"].isin(dropped)].copy()
    split = check_split(split, conditions - set(dropped), set(dropped))
    split_path = workdir / "split_custom.pkl"
    with open(split_path, "wb") as f:
        pickle.dump(split, f)

    pert_data = PertData(str(workdir), gene_set_path=str(gene_set_path))
    t0 = time.perf_counter()
    pert_data.new_data_process(dataset_name=DATASET, adata=adata)
    process_s = time.perf_counter() - t0
    _log(f"new_data_process: {process_s:.1f}s")
    disk_mb = _dir_mb(workdir)
    pert_data.prepare_split(split="custom", split_dict_path=str(split_path))
    pert_data.get_dataloader(batch_size=args.batch_size, test_batch_size=128)

    pert_data.adata.X = _pandas_mask_csr(pert_data.adata.X)
    gears_model = GEARS(pert_data, device="cpu")
    t0 = time.perf_counter()
    # GEARS would run make_GO inside model_initialize with Pool(25); run it first with our thread
    # budget so model_initialize finds the cached csv (same function, same graph)
    make_GO(pert_data.data_path, gears_model.pert_list, DATASET, num_workers=args.threads)
    go_graph_s = time.perf_counter() - t0
    gears_model.model_initialize(hidden_size=args.hidden)
    init_s = time.perf_counter() - t0
    _log(f"make_GO: {go_graph_s:.1f}s, make_GO + model_initialize: {init_s:.1f}s")
    epoch_train_s, epoch_eval_s = _train(gears_model, args.epochs)

    targets = list(dict.fromkeys(split["test"] + split["val"]))
    t0 = time.perf_counter()
    pred = gears_model.predict([_genes_of(c) for c in targets])
    predict_s = time.perf_counter() - t0
    predictions = {c: [float(v) for v in pred["_".join(_genes_of(c))]] for c in targets}
    return {"package": "cell-gears", "version": version("cell-gears"), "torch": torch.__version__,
            "threads": args.threads, "batch_size": args.batch_size, "epochs": args.epochs,
            "hidden": args.hidden, "seed": args.seed, "process_s": process_s,
            "go_graph_s": go_graph_s, "init_s": init_s, "epoch_train_s": epoch_train_s,
            "epoch_eval_s": epoch_eval_s, "predict_s": predict_s,
            "n_train_cells": len(pert_data.dataloader["train_loader"].dataset),
            "n_perts_in_go_graph": len(gears_model.pert_list), "dropped_conditions": dropped,
            "genes": list(gears_model.gene_list), "predictions": predictions,
            "peak_rss_mb": _peak_rss_mb(), "disk_mb": disk_mb}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h5ad", type=Path, required=True, help="cells x genes, GEARS naming")
    p.add_argument("--go", type=Path, required=True, help="GO table: symbol/gene_symbol, go_id")
    p.add_argument("--split", type=Path, required=True, help="JSON with train/val/test lists")
    p.add_argument("--workdir", type=Path, required=True, help="GEARS data folder (created)")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=64)
    args = p.parse_args(argv)
    for name, low in (("epochs", 1), ("batch_size", 1), ("threads", 1), ("hidden", 1),
                      ("seed", 0)):
        if getattr(args, name) < low:
            _fail(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    # GEARS iterates sets of condition names (loss_fct's `set(perts)`): the loss summation order,
    # hence the trained weights, depend on string hashing; fix it so a seed reproduces a run
    if os.environ.get("PYTHONHASHSEED") != str(args.seed):
        _log(f"re-executing with PYTHONHASHSEED={args.seed}")
        env = {**os.environ, "PYTHONHASHSEED": str(args.seed)}
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)
    # GEARS prints to stdout in places (pertdata.get_pert_idx, make_GO): keep stdout for the JSON
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
