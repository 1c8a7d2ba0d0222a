"""`pertscale bench gears`: our GEARS fine-tune beside the reference package cell-gears 0.1.2, on
the same cells, split and CPU threads, in one run.

    pertscale bench gears --peer-python .venv-gears/bin/python [--epochs 20] [--seeds 1,2,3]
                          [--threads 2] [--out bench_results/gears.json]

Data: the Norman 2019 K562 CRISPRa subset of ../shared/data (obs dataset == norman19), ingested
into a store; the split is GEARS' simulation split (seed 1) as pertscale computes it, handed to
the reference as a custom split, so both train, validate and test on the same conditions. Ours:
`configs/gears_norman.toml` on `--threads` Ray workers of one thread each, each taking
batch / workers cells per step, so that a step sees the reference's batch of `--batch-size`
cells; the reference: one process with `--threads` torch threads
(`pertscale/bench/gears_peer.py`, run by the reference's own interpreter). Timed per epoch: the batch loop only (validation excluded on both sides).
Quality: both models' predicted mean changes on the unseen singles (the conditions both can
represent), and the train-mean baseline, scored by pertscale's metrics; mean and spread over
the seeds (model seeds; the split seed stays 1). Prints a table and writes JSON.
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
DEFAULT_H5AD = REPO.parent / "shared/data/perturbseq/norman2019_mcfaline2023_devel.h5ad"
DEFAULT_GO = REPO.parent / "shared/data/go/human_gene2go_direct.tsv.gz"
CONFIG = REPO / "configs/gears_norman.toml"
PEER = Path(__file__).with_name("gears_peer.py")


def _gears_name(label: str, control: str) -> str:
    """GEARS' condition naming: ctrl, A+ctrl (a single), A+B (a combination)."""
    if label == control:
        return "ctrl"
    return label if "+" in label else f"{label}+ctrl"


def _prepare(h5ad: Path, work: Path) -> tuple[str, Path, dict[str, str]]:
    """The store (ingested once), the reference's h5ad, and canonical perturbation -> GEARS
    condition name."""
    import anndata as ad

    from pertscale.data.perturbation import parse_perturbation
    from pertscale.store.ingest import IngestConfig, ingest

    store = work / "store"
    if not (store / "zarr.json").is_file():
        ingest([h5ad], store, IngestConfig(values="normalised"))
    adata = ad.read_h5ad(h5ad)
    adata = adata[adata.obs["dataset"].astype(str) == "norman19"].copy()
    labels = adata.obs["perturbation"].astype(str)
    adata.obs["condition"] = [_gears_name(lbl, "control") for lbl in labels]
    adata.var["gene_name"] = adata.var_names.astype(str)
    peer_h5ad = work / "peer_cells.h5ad"
    adata.write_h5ad(peer_h5ad)
    names = {parse_perturbation(lbl, control_labels=("control",)).name: _gears_name(lbl, "control")
             for lbl in sorted(set(labels))}
    return str(store), peer_h5ad, names


def _split_json(split: Any, data: Any, names: dict[str, str], path: Path) -> None:
    def gears(conds: list[str]) -> list[str]:
        return sorted({names[data.conditions.at[c, "perturbation"]] for c in conds})

    test = [c for group in split.test.values() for c in group]
    path.write_text(json.dumps({"train": ["ctrl", *gears(split.train)],
                                "val": gears(split.val), "test": gears(test)}))


def _ours(store: str, seed: int, epochs: int, threads: int, batch: int) -> dict[str, Any]:
    from mlflow import MlflowClient

    from pertscale.config import load_config
    from pertscale.tracking import TrackingConfig, resolve_tracking_uri
    from pertscale.training.finetune import run_finetune

    job = load_config(CONFIG, [f"--data.store_uri={store}", f"--epochs={epochs}",
                               f"--data.seed={seed}", f"--trainer.seed={seed}",
                               f"--trainer.num_workers={threads}",
                               f"--data.batch_size={batch // threads}",
                               f"--trainer.ray_num_cpus={threads}",
                               f"--trainer.run_name=bench-gears-{seed}-{int(time.time())}",
                               "--trainer.checkpoint_every=1000000",
                               "--tracking.register=false"], job="finetune")
    t0 = time.perf_counter()
    result = run_finetune(job, show_progress=False)
    total = time.perf_counter() - t0
    client = MlflowClient(resolve_tracking_uri(TrackingConfig()))
    epochs_s = [m.value for m in sorted(client.get_metric_history(result.mlflow_run_id,
                                                                  "epoch_train_s"),
                                        key=lambda m: m.step)]
    return {"epoch_train_s": epochs_s, "total_s": total, "training": result.training,
            "summary": result.summary, "exported": Path(result.checkpoint_dir) / "model"}


def _peer(python: str, h5ad: Path, go: Path, split: Path, work: Path, seed: int, epochs: int,
          threads: int, batch: int) -> dict[str, Any]:
    cmd = [python, str(PEER), "--h5ad", str(h5ad), "--go", str(go), "--split", str(split),
           "--workdir", str(work / f"peer-{seed}"), "--epochs", str(epochs),
           "--batch-size", str(batch), "--seed", str(seed), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _score(data: Any, conds: list[str], delta_CG: np.ndarray) -> dict[str, float]:
    from pertscale.eval.report import score_conditions

    frame = score_conditions(data, conds, delta_CG)
    return {m: float(frame[m].mean()) for m in ("pearson_delta_de", "mse_de", "pearson_delta")}


def _spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f} +- {np.std(values):.3f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pertscale bench gears", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", required=True,
                        help="python of a venv with cell-gears==0.1.2 and torch_geometric")
    parser.add_argument("--h5ad", type=Path, default=DEFAULT_H5AD)
    parser.add_argument("--go", type=Path, default=DEFAULT_GO)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", default="1,2,3", help="model seeds (the split seed is 1)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="cells per optimizer step on both sides (ours: split over workers)")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads of each side (ours: workers of one thread)")
    parser.add_argument("--work", type=Path, default=Path("bench_results/gears_work"))
    parser.add_argument("--out", type=Path, default=Path("bench_results/gears.json"))
    args = parser.parse_args(argv)
    for path in (args.h5ad, args.go, Path(args.peer_python)):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.batch_size % args.threads:
        raise ValueError(f"--batch-size {args.batch_size} must split evenly over --threads "
                         f"{args.threads} workers")
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["PERTSCALE_STORAGE"] = str((args.work / "storage").resolve())

    from pertscale.config import load_config
    from pertscale.eval.baselines import build_baseline
    from pertscale.eval.evaluation import load_eval_data
    from pertscale.models import get_spec
    from pertscale.tracking import load_model_dir

    store, peer_h5ad, names = _prepare(args.h5ad, args.work)
    job = load_config(CONFIG, [f"--data.store_uri={store}"], job="finetune")
    from pertscale.eval.config import EvalDataConfig

    data, split, _ = load_eval_data(EvalDataConfig(
        store_uri=store, perturbation=job.data.perturbation, split=job.data.split))
    split_path = args.work / "split.json"
    _split_json(split, data, names, split_path)
    unseen = split.test["unseen_single"]
    ctrl = np.stack([data.ctrl_mean(c) for c in unseen])
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        ours = _ours(store, seed, args.epochs, args.threads, args.batch_size)
        peer = _peer(args.peer_python, peer_h5ad, args.go, split_path, args.work, seed,
                     args.epochs, args.threads, args.batch_size)
        predicted = {c: names[data.conditions.at[c, "perturbation"]] for c in unseen}
        both = [c for c in unseen if predicted[c] in peer["predictions"]]
        col = {g: i for i, g in enumerate(peer["genes"])}
        order = np.array([col[g] for g in data.symbols])
        peer_delta = np.stack([np.asarray(peer["predictions"][predicted[c]])[order]
                               for c in both]) - ctrl[[unseen.index(c) for c in both]]
        exported = load_model_dir(ours["exported"])
        predictor = get_spec("gears").load(exported)
        perts = [data.perturbation(c) for c in both]
        index = {g: i for i, g in enumerate(predictor.genes)}
        our_delta = predictor.predict_delta(perts)[:, [index[g] for g in data.genes]]
        mean = build_baseline("train_mean", linear=job.report.linear,
                              embeddings=None).fit(data, split.train)
        runs.append({"seed": seed, "conditions": both,
                     "ours": {"epoch_train_s": ours["epoch_train_s"], "total_s": ours["total_s"],
                              **_score(data, both, our_delta)},
                     "reference": {k: peer[k] for k in ("epoch_train_s", "process_s",
                                                        "peak_rss_mb", "disk_mb",
                                                        "dropped_conditions")}
                     | _score(data, both, peer_delta),
                     "train_mean": _score(data, both, mean.predict_delta(data, both))})
        print(f"seed {seed}: ours {runs[-1]['ours']['pearson_delta_de']:.3f}, reference "
              f"{runs[-1]['reference']['pearson_delta_de']:.3f}, train_mean "
              f"{runs[-1]['train_mean']['pearson_delta_de']:.3f}", file=sys.stderr)

    ours_ep = [s for r in runs for s in r["ours"]["epoch_train_s"]]
    ref_ep = [s for r in runs for s in r["reference"]["epoch_train_s"]]
    table = {
        "epoch_train_s": {"ours_best": min(ours_ep), "ours_median": float(np.median(ours_ep)),
                          "reference_best": min(ref_ep),
                          "reference_median": float(np.median(ref_ep)),
                          "speedup_best": min(ref_ep) / min(ours_ep),
                          "speedup_median": float(np.median(ref_ep) / np.median(ours_ep))},
        "unseen_single": {who: {m: [r[who][m] for r in runs]
                                for m in ("pearson_delta_de", "mse_de", "pearson_delta")}
                          for who in ("ours", "reference", "train_mean")},
    }
    print(f"GEARS on Norman 2019, {len(seeds)} seeds, {args.epochs} epochs, {args.batch_size} "
          f"cells per step ({args.threads} workers x {args.batch_size // args.threads} for ours), "
          f"{args.threads} CPU threads each")
    print("| | epoch train s (best / median) | Pearson delta DE, unseen singles | MSE DE |")
    print("|---|---|---|---|")
    for who, ep in (("pertscale gears", ours_ep), ("cell-gears 0.1.2", ref_ep)):
        key = "ours" if who.startswith("pertscale") else "reference"
        q = table["unseen_single"][key]
        print(f"| {who} | {min(ep):.2f} / {np.median(ep):.2f} | "
              f"{_spread(q['pearson_delta_de'])} | {_spread(q['mse_de'])} |")
    q = table["unseen_single"]["train_mean"]
    print(f"| train_mean | - | {_spread(q['pearson_delta_de'])} | {_spread(q['mse_de'])} |")
    print(f"epoch speed-up (reference / ours): best {table['epoch_train_s']['speedup_best']:.2f}x,"
          f" median {table['epoch_train_s']['speedup_median']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"table": table, "runs": runs, "epochs": args.epochs,
                                    "threads": args.threads, "batch_size": args.batch_size},
                                   indent=2, default=str))
    print(f"wrote {args.out}")
    return 0
