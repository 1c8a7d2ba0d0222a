"""`pertscale predict`: predicted expression of perturbations from a registered model.

    pertscale predict --model models:/pertscale-genepert@champion --perturbations "A+B,C,-D" \
        --control STORE [--covariate-column cell_type] [--cells N] --out predicted.h5ad (or .csv)

The model (any spec that predicts mean changes) is pulled and verified; each perturbation label
is parsed as in the data ("+" joins genes, a leading "-" marks an inhibited gene) and a gene the
model cannot represent is refused, naming it. The control cells of STORE (labels
`--control-labels` in `--perturbation-column`) give the baseline: their mean log1p-normalised
expression, per value of `--covariate-column` when given (one prediction per perturbation and
covariate), else pooled. Prediction = control mean + predicted change, over the model's readout
genes. The .h5ad has obs = perturbation (and covariate), var = genes (with symbols when the store
has them), X = predicted mean expression; `uns["pertscale"]` records the model and the store.

`--cells N` predicts cells instead of means, as GEARS does: N control cells of each covariate
value, drawn with a generator seeded by `--seed`, each plus the predicted change of each
perturbation (obs `control_cell` names the store row of the cell it started from).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pertscale.data.perturbation import PerturbationConfig, parse_perturbation

__all__ = ["main", "predict_table"]

log = logging.getLogger(__name__)


def _control_means(store_uri: str, cfg: PerturbationConfig):
    """(covariates, mean [C, G] of control cells, store genes, symbols)."""
    from pertscale.data.perturbation import load_perturbation_data
    from pertscale.store import open_store

    data = load_perturbation_data(open_store(store_uri), cfg)
    ctrl = data.conditions[data.conditions["is_control"]]
    means = np.stack([data.mean(c) for c in ctrl.index])
    return ctrl["covariate"].astype(str).tolist(), means, data.genes, data.symbols


def _control_cells(store_uri: str, cfg: PerturbationConfig, covariates: list[str], n: int,
                   seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(store rows [n], log1p-normalised expression [n, G]) of n control cells per covariate."""
    from pertscale.data.paired import read_dense_rows
    from pertscale.data.perturbation import _group_cells
    from pertscale.store import open_store

    src = open_store(store_uri)
    codes, table, _, _ = _group_cells(src.obs, cfg, src.uri)
    rng = np.random.default_rng(seed)
    out = []
    for cov in covariates:
        ctrl = table.index[table["is_control"] & (table["covariate"] == cov)][0]
        pool = np.flatnonzero(codes == table.index.get_loc(ctrl))
        rows = np.sort(rng.choice(pool, size=min(n, pool.size), replace=False))
        out.append((rows, read_dense_rows(src, rows, log_normalise=bool(src.raw_counts),
                                          target_sum=cfg.target_sum)))
    return out


def predict_table(model_uri: str, labels: list[str], control_uri: str, *,
                  covariate_column: str = "", perturbation_column: str = "perturbation",
                  control_labels: tuple[str, ...] = ("ctrl", "control"),
                  tracking_uri: str = "", cells: int = 0, seed: int = 0):
    """The predictions as an AnnData (see the module docstring)."""
    import anndata as ad

    from pertscale.models import get_spec
    from pertscale.tracking import TrackingConfig, pull_model

    if not labels:
        raise ValueError("--perturbations is empty: give labels such as 'A+B,C'")
    perts = [parse_perturbation(label, control_labels=control_labels) for label in labels]
    controls = [label for label, p in zip(labels, perts) if p.is_control]
    if controls:
        raise ValueError(f"--perturbations lists control label(s) {controls}: the control is the "
                         f"baseline, not a perturbation")
    pulled = pull_model(model_uri, tracking=TrackingConfig(uri=tracking_uri))
    spec = get_spec(pulled.kind)
    if spec.predicts != "delta":
        raise ValueError(f"{model_uri} is a {spec.name} model, which predicts {spec.predicts}s, "
                         f"not perturbation effects")
    predictor = pulled.predictor()
    missing = predictor.missing_genes(perts)
    if missing:
        raise ValueError(f"{model_uri} cannot represent perturbed gene(s) {missing}: they are not "
                         f"in the genes it was fitted or trained with")
    cfg = PerturbationConfig(perturbation_column=perturbation_column,
                             control_labels=list(control_labels),
                             covariate_column=covariate_column,
                             filter_column=perturbation_column, filter_values=list(control_labels))
    covariates, ctrl_CG, store_genes, symbols = _control_means(control_uri, cfg)
    log.info("control baseline: %s", f"per {covariate_column} {covariates}" if covariate_column
             else "all control cells pooled (no --covariate-column)")
    position = {g: i for i, g in enumerate(store_genes)}
    absent = [g for g in predictor.genes if g not in position]
    if absent:
        raise ValueError(f"control store {control_uri} lacks {len(absent)} of the model's genes, "
                         f"e.g. {absent[:5]}")
    cols = np.array([position[g] for g in predictor.genes])
    rows, blocks = [], []
    controls = _control_cells(control_uri, cfg, covariates, cells, seed) if cells else None
    for k, (cov, ctrl_G) in enumerate(zip(covariates, ctrl_CG)):
        delta_PG = np.asarray(predictor.predict_delta(perts, [cov] * len(perts)))
        where = {covariate_column: cov} if covariate_column else {}
        if controls is None:
            blocks.append(ctrl_G[cols][None, :] + delta_PG)
            rows += [{"perturbation": p.name, **where} for p in perts]
            continue
        cell_rows, x_NG = controls[k]
        for p, delta_G in zip(perts, delta_PG):
            blocks.append(x_NG[:, cols] + delta_G[None, :])
            rows += [{"perturbation": p.name, **where, "control_cell": int(r)} for r in cell_rows]
    obs = pd.DataFrame(rows)
    obs.index = [f"{r['perturbation']}|{r.get(covariate_column, 'all')}"
                 + (f"|{r['control_cell']}" if "control_cell" in r else "") for r in rows]
    var = pd.DataFrame({"gene_symbol": [symbols[position[g]] for g in predictor.genes]},
                       index=pd.Index(predictor.genes, name="gene_id"))
    uns = {"pertscale": {"model_uri": model_uri, "model_version": f"models:/{pulled.name}/"
                         f"{pulled.version}", "control_store": control_uri,
                         "values": ("log1p-normalised expression (control cell + change)" if cells
                                    else "mean log1p-normalised expression (control mean + "
                                         "change)")}}
    return ad.AnnData(X=np.vstack(blocks).astype(np.float32), obs=obs, var=var, uns=uns)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pertscale predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--perturbations", required=True,
                        help='comma-separated labels, e.g. "A+B,C,-D"')
    parser.add_argument("--control", required=True, help="cell store with the control cells")
    parser.add_argument("--out", required=True, help="output .h5ad or .csv")
    parser.add_argument("--covariate-column", default="",
                        help="obs column with one control per value (e.g. cell_type); "
                             "default: pool all control cells")
    parser.add_argument("--perturbation-column", default="perturbation")
    parser.add_argument("--control-labels", default="ctrl,control",
                        help="comma-separated labels of control cells")
    parser.add_argument("--cells", type=int, default=0,
                        help="predict N cells per perturbation and covariate (control cells + "
                             "change) instead of means")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn control cells")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or storage/mlflow)")
    args = parser.parse_args(argv)
    if args.cells < 0:
        raise ValueError(f"--cells {args.cells} must be >= 0 (0 = predicted means)")
    out = Path(args.out)
    if out.suffix not in (".h5ad", ".csv"):
        raise ValueError(f"--out {out} must end in .h5ad or .csv")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    labels = [s.strip() for s in args.perturbations.split(",") if s.strip()]
    adata = predict_table(args.model, labels, args.control,
                          covariate_column=args.covariate_column,
                          perturbation_column=args.perturbation_column,
                          control_labels=tuple(s.strip() for s in args.control_labels.split(",")),
                          tracking_uri=args.tracking_uri, cells=args.cells, seed=args.seed)
    if out.suffix == ".h5ad":
        adata.write_h5ad(out)
    else:
        frame = pd.DataFrame(adata.X, columns=adata.var_names, index=adata.obs_names)
        pd.concat([adata.obs.reset_index(drop=True), frame.reset_index(drop=True)],
                  axis=1).to_csv(out, index=False)
    print(f"wrote {adata.n_obs} predictions x {adata.n_vars} genes to {out} "
          f"({adata.uns['pertscale']['model_version']})")
    return 0
