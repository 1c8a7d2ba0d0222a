"""cell-eval side of the metric agreement check: run as a script by another Python.

cell-eval (PyPI `cell-eval`, with its DE engine pdex) lives in its own venv, so this file imports
nothing from pertscale. It scores predicted AnnData files against the real one with cell-eval's
challenge profile (`MetricsEvaluator(...).compute(profile="vcc")`: mae,
discrimination_score_l1, overlap_at_N) and scores each prediction against a baseline
prediction with `score_agg_metrics`, then prints one JSON object on stdout:

    {"version": ..., "results": {name: [{"perturbation": ..., metric: value, ...}, ...]},
     "scores": {name: {metric: score, "avg_score": ...}}}

    python celleval_peer.py --real real.h5ad --pred NAME=pred.h5ad [--pred ...]
        --baseline NAME --control non-targeting --pert-col target_gene --outdir DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _score(real, pred_path: str, args, name: str):
    import anndata as ad
    from cell_eval import MetricsEvaluator

    evaluator = MetricsEvaluator(
        adata_pred=ad.read_h5ad(pred_path), adata_real=real.copy(),
        control_pert=args.control, pert_col=args.pert_col, num_threads=1,
        outdir=str(Path(args.outdir) / name))
    return evaluator.compute(profile="vcc", write_csv=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", required=True)
    parser.add_argument("--pred", action="append", required=True, help="NAME=PATH")
    parser.add_argument("--baseline", required=True, help="the NAME scores are relative to")
    parser.add_argument("--control", default="non-targeting")
    parser.add_argument("--pert-col", default="target_gene")
    parser.add_argument("--outdir", required=True)
    args = parser.parse_args()

    import anndata as ad
    from cell_eval import score_agg_metrics

    real = ad.read_h5ad(args.real)
    results, aggregated = {}, {}
    for item in args.pred:
        name, _, path = item.partition("=")
        res, agg = _score(real, path, args, name)
        results[name] = res.to_dicts()
        aggregated[name] = agg
    if args.baseline not in aggregated:
        print(f"celleval_peer: error: --baseline {args.baseline} is not a --pred name",
              file=sys.stderr)
        return 2
    scores = {}
    for name, agg in aggregated.items():
        table = score_agg_metrics(agg, aggregated[args.baseline])
        scores[name] = {row["metric"]: row["from_baseline"] for row in table.to_dicts()}
    from importlib.metadata import version

    print(json.dumps({"version": version("cell-eval"), "results": results, "scores": scores}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
