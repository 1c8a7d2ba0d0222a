"""`pertscale bench scgen`: our scgen fine-tune beside the reference package scgen 2.1.0 on Kang
2018 IFN-beta PBMCs, holding out each cell type's stimulated cells in turn, in one run.

    pertscale bench scgen --peer-python .venv-scgen/bin/python [--types "CD4 T cells,B cells"]
                          [--seed 0] [--epochs N] [--out bench_results/scgen.json]

Data: ../shared/data/kang (raw counts; 5 cell types x ctrl / stim), ingested once into a store;
both sides see the same cells, genes and values: the reference gets an h5ad written from our
store with our log1p normalisation (counts scaled to 1e4 per cell). Ours:
`configs/scgen_kang.toml` (2 Ray workers x 16 cells = the reference's batch of 32, 100 epochs at
most, early stopping with patience 25 on 10% validation cells, as the reference); the reference:
its tutorial settings (`pertscale/bench/scgen_peer.py`: 100 epochs at most,
early stopping with patience 25 on 10% validation cells, batch 32), run by its own interpreter.
Scored by pertscale's metrics on the held-out type: R^2 of means as scGen reports it (squared
Pearson of per-gene means) on all genes and on the top 100 DE genes of stimulated vs control,
beside no change and the other types' mean change (`matching_mean`). Prints a table and writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_H5AD = REPO.parent / "shared/data/kang/kang2018_muscat_example_sce.h5ad"
CONFIG = REPO / "configs/scgen_kang.toml"
PEER = Path(__file__).with_name("scgen_peer.py")
OBS = ("group_id", "cluster_id", "sample_id")
MODELS = ("scgen", "reference", "no_change", "matching_mean")


def _prepare(h5ad: Path, work: Path, target_sum: float) -> tuple[str, Path]:
    """The store (ingested once) and the reference's h5ad: the store's cells, log1p-normalised
    as pertscale normalises them, obs cell_type / condition."""
    import anndata as ad
    import pandas as pd

    from pertscale.data.perturbation import normalise_counts
    from pertscale.store import open_store
    from pertscale.store.ingest import IngestConfig, ingest

    store = work / "store"
    if not (store / "zarr.json").is_file():
        ingest([h5ad], store, IngestConfig(obs_columns=list(OBS)))
    src = open_store(str(store))
    x = normalise_counts(src.read_csr(0, src.n_cells), target_sum, np.arange(src.n_cells))
    obs = pd.DataFrame({"cell_type": src.obs["cluster_id"].astype(str).to_numpy(),
                        "condition": src.obs["group_id"].astype(str).to_numpy()},
                       index=src.obs.index.astype(str))
    peer_h5ad = work / "peer_cells.h5ad"
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=src.var.index.astype(str))).write_h5ad(
        peer_h5ad)
    return str(store), peer_h5ad


def _ours(store: str, heldout: str, seed: int, epochs: int) -> dict[str, Any]:
    from pertscale.config import load_config
    from pertscale.training.finetune import run_finetune

    job = load_config(CONFIG, [f"--data.store_uri={store}",
                               *([f"--epochs={epochs}"] if epochs else []),
                               f"--data.split.heldout={heldout}", f"--trainer.seed={seed}",
                               f"--data.seed={seed}", f"--model.seed={seed}",
                               f"--trainer.run_name=bench-scgen-{seed}-{int(time.time())}",
                               "--trainer.checkpoint_every=1000000",
                               "--tracking.register=false"], job="finetune")
    t0 = time.perf_counter()
    result = run_finetune(job, show_progress=False)
    return {"total_s": time.perf_counter() - t0, "summary": result.summary,
            "epochs_run": result.training.get("epochs_run")}


def _peer(python: str, h5ad: Path, heldout: str, seed: int, threads: int) -> dict[str, Any]:
    cmd = [python, str(PEER), "--h5ad", str(h5ad), "--cell-type-key", "cell_type",
           "--condition-key", "condition", "--control", "ctrl", "--stimulated", "stim",
           "--held-out", heldout, "--seed", str(seed), "--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pertscale bench scgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", required=True,
                        help="python of a venv with scgen==2.1.0 (make .venv-scgen)")
    parser.add_argument("--h5ad", type=Path, default=DEFAULT_H5AD)
    parser.add_argument("--types", default="", help="comma-separated cell types (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=0,
                        help="our epochs at most (default: the config's)")
    parser.add_argument("--threads", type=int, default=2, help="the reference's torch threads")
    parser.add_argument("--work", type=Path, default=Path("bench_results/scgen_work"))
    parser.add_argument("--out", type=Path, default=Path("bench_results/scgen.json"))
    args = parser.parse_args(argv)
    for path in (args.h5ad, Path(args.peer_python)):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["PERTSCALE_STORAGE"] = str((args.work / "storage").resolve())

    from pertscale.config import load_config
    from pertscale.eval.config import EvalDataConfig
    from pertscale.eval.evaluation import load_eval_data
    from pertscale.eval.metrics import r2_pearson

    job = load_config(CONFIG, [], job="finetune")
    store, peer_h5ad = _prepare(args.h5ad, args.work, job.data.perturbation.target_sum)
    data, _, _ = load_eval_data(EvalDataConfig(
        store_uri=store, perturbation=job.data.perturbation, split=job.data.split))
    covs = data.conditions["covariate"]
    types = ([t.strip() for t in args.types.split(",") if t.strip()] or
             sorted(set(covs[data.perturbed])))
    rows: list[dict[str, Any]] = []
    for heldout in types:
        cond = next(c for c in data.perturbed if covs[c] == heldout)
        true, de = data.mean(cond), data.de_idx[cond]
        ours = _ours(store, heldout, args.seed, args.epochs)
        summary = ours["summary"].set_index("model")
        peer = _peer(args.peer_python, peer_h5ad, heldout, args.seed, args.threads)
        col = {g: i for i, g in enumerate(peer["genes"])}
        ref = np.asarray(peer["pred_mean"])[[col[g] for g in data.genes]]
        row = {"heldout": heldout, "n_de_genes": len(de), "ours_s": ours["total_s"],
               "ours_epochs": ours["epochs_run"],
               "reference_s": peer["wall_s"], "reference_train_s": peer["train_s"],
               "reference_epochs": peer["epochs_run"], "reference_versions": peer["versions"],
               "reference": {"r2_all": r2_pearson(ref, true), "r2_de": r2_pearson(ref, true, de)}}
        for model in ("scgen", "no_change", "matching_mean"):
            row[model] = {"r2_all": float(summary.at[model, "r2_pearson_mean"]),
                          "r2_de": float(summary.at[model, "r2_pearson_mean_de"])}
        rows.append(row)
        print(f"{heldout}: " + ", ".join(f"{m} {row[m]['r2_all']:.3f}/{row[m]['r2_de']:.3f}"
                                        for m in MODELS), file=sys.stderr)

    print(f"scGen on Kang 2018 (held-out type's stimulated cells), R^2 of means (squared Pearson)"
          f" all genes / top-{rows[0]['n_de_genes']} DE genes; seed {args.seed}; both "
          f"early-stopped")
    print("| held-out type | pertscale scgen | scgen 2.1.0 | no change | other types' mean "
          "| wall s ours / ref | epochs ours / ref |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[m]['r2_all']:.3f} / {r[m]['r2_de']:.3f}" for m in MODELS]
        print(f"| {r['heldout']} | " + " | ".join(cells)
              + f" | {r['ours_s']:.0f} / {r['reference_s']:.0f}"
              f" | {r['ours_epochs']} / {r['reference_epochs']} |")
    means = {m: {k: float(np.mean([r[m][k] for r in rows])) for k in ("r2_all", "r2_de")}
             for m in MODELS}
    print("| mean | " + " | ".join(f"{means[m]['r2_all']:.3f} / {means[m]['r2_de']:.3f}"
                                   for m in MODELS) + " | | |")
    wins = {f"scgen_beats_{m}": {k: sum(r["scgen"][k] > r[m][k] for r in rows)
                                 for k in ("r2_all", "r2_de")}
            for m in ("no_change", "matching_mean", "reference")}
    print("types where pertscale scgen is ahead (all / DE): "
          + ", ".join(f"{m.removeprefix('scgen_beats_')} {v['r2_all']}/{v['r2_de']} of {len(rows)}"
                      for m, v in wins.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "mean": means, "wins": wins,
                                    "seed": args.seed, "epochs": args.epochs}, indent=2,
                                   default=str))
    print(f"wrote {args.out}")
    return 0
