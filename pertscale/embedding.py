"""`pertscale embed`: per-cell latents (and pathway activities) of a registered model, streamed
from a store, and a per-perturbation table of pathway activity discrepancy against control.

    pertscale embed --model models:/pertscale-pathway_vae@latest --store STORE --out OUT.zarr
        [--perturbation-column perturbation --control-labels ctrl,control
         --covariate-column cell_type] [--batch-size 1024] [--tracking-uri URI] [--no-log]

Cells are read `--batch-size` at a time in store order, embedded, and written at once:
- OUT.zarr: a zarr group with arrays `latent` [cells, Z] and, for pathway models,
  `pathway_activity` [cells, P] (float32, row i = store row i), and attributes naming the model,
  the store (uri, fingerprint) and the pathways;
- OUT.h5ad: an AnnData without X: obs = the store's cell ids (and the grouping columns), obsm
  `X_<model>` (latent) and `pathway_activity`, uns `pertscale` (model, store, pathways).
Memory is one batch plus, for .h5ad, the cell ids. The output is written beside its final
name and renamed when complete; an existing output is refused, never replaced.

With `--perturbation-column`, pathway models also get the discrepancy table of
pertscale.eval.discrepancy (OUT stem + `.discrepancy.tsv`) and its heatmap (`.discrepancy.png`),
from per-group moments accumulated while streaming; an `embed` MLflow run logs both with the
model and store as lineage (unless `--no-log`).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["embed_store", "main"]

log = logging.getLogger(__name__)
SUFFIXES = (".zarr", ".h5ad")


def _gene_map(embedder: Any, store: Any, model_uri: str) -> np.ndarray:
    """Model gene index of each store gene (-1: not a model gene); no shared gene is an error."""
    index = {g: i for i, g in enumerate(embedder.genes)}
    cols = np.array([index.get(str(g), -1) for g in store.var.index], dtype=np.int64)
    shared = int((cols >= 0).sum())
    if not shared:
        raise ValueError(f"store {store.uri} shares no gene id with {model_uri} (model genes "
                         f"e.g. {embedder.genes[:3]}, store genes e.g. "
                         f"{list(store.var.index[:3])})")
    if shared < len(embedder.genes):
        log.warning("store %s measures %d of the model's %d genes; the others count as unmeasured",
                    store.uri, shared, len(embedder.genes))
    return cols


def _encode(embedder: Any, x, cols: np.ndarray, seed: int):
    """(latent [n, Z], activities [n, P] or None) of a CSR block over the store's genes."""
    import scipy.sparse as sp

    if hasattr(embedder, "encode_csr"):
        keep = cols[x.indices] >= 0
        rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))[keep]
        m = sp.csr_matrix((x.data[keep], (rows, cols[x.indices][keep])),
                          shape=(x.shape[0], len(embedder.genes)))
        m.sort_indices()
        return embedder.encode_csr(m.indptr.astype(np.int64), m.indices, m.data, seed)
    shared = np.flatnonzero(cols >= 0)
    latent = embedder.embed(x[:, shared].toarray(), [embedder.genes[c] for c in cols[shared]],
                            seed)
    return latent, None


class _Writer:
    """Rows of latents / activities into OUT (zarr group or h5ad), written under a partial name."""

    def __init__(self, out: Path, n_cells: int, dims: dict[str, int], attrs: dict[str, Any],
                 obs: pd.DataFrame | None, key: str):
        self.out, self.partial = out, out.parent / f".{out.name}.partial"
        if self.partial.exists():
            raise FileExistsError(f"{self.partial} exists (an interrupted embed?): remove it")
        self.kind = out.suffix
        self.names = {"latent": key, "pathway_activity": "pathway_activity"}
        if self.kind == ".zarr":
            import zarr

            self.root = zarr.open_group(str(self.partial), mode="w-")
            self.root.attrs.update(attrs)
            self.arrays = {name: self.root.create_array(
                name, shape=(n_cells, d), chunks=(min(max(n_cells, 1), 16384), d),
                dtype="float32") for name, d in dims.items()}
        else:
            import h5py
            from anndata.io import write_elem

            self.file = h5py.File(self.partial, "w-")
            self.file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            write_elem(self.file, "obs", obs)
            write_elem(self.file, "var", pd.DataFrame(index=pd.Index([], dtype=str)))
            write_elem(self.file, "uns", {"pertscale": attrs})
            obsm = self.file.create_group("obsm")
            obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
            self.arrays = {}
            for name, d in dims.items():
                ds = obsm.create_dataset(self.names[name], shape=(n_cells, d), dtype="float32",
                                         chunks=(min(max(n_cells, 1), 4096), d))
                ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
                self.arrays[name] = ds

    def write(self, start: int, values: dict[str, np.ndarray]) -> None:
        for name, v in values.items():
            self.arrays[name][start:start + len(v)] = v.astype(np.float32)

    def close(self, ok: bool) -> None:
        if self.kind == ".h5ad":
            self.file.close()
        if not ok:
            (shutil.rmtree if self.partial.is_dir() else Path.unlink)(self.partial)
            return
        self.partial.rename(self.out)


def embed_store(model_uri: str, store_uri: str, out: str | Path, *, batch_size: int = 1024,
                perturbation_column: str = "", control_labels: tuple[str, ...] = ("ctrl",
                                                                                   "control"),
                covariate_column: str = "", seed: int = 0, tracking_uri: str = "",
                log_run: bool = True) -> dict[str, Any]:
    """Embed every cell of `store_uri` with the registered `model_uri` into `out` (module
    docstring); returns what was written (paths, counts, and the discrepancy table or None)."""
    from pertscale.eval.discrepancy import GroupMoments, discrepancy_table, plot_discrepancy
    from pertscale.models import get_spec
    from pertscale.store import open_store
    from pertscale.tracking import TrackingConfig, pull_model

    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise ValueError(f"--out {out} must end in .zarr or .h5ad")
    if out.exists():
        raise FileExistsError(f"--out {out} exists: choose a new name (embed never replaces "
                              f"a file)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    pulled = pull_model(model_uri, tracking=TrackingConfig(uri=tracking_uri))
    spec = get_spec(pulled.kind)
    if spec.predicts != "embedding":
        raise ValueError(f"{model_uri} is a {spec.name} model, which predicts {spec.predicts}s, "
                         f"not cell embeddings")
    embedder = pulled.predictor()
    store = open_store(store_uri)
    model_raw = getattr(embedder, "raw_counts", None)
    if model_raw is not None and model_raw != bool(store.raw_counts):
        kind = {True: "raw counts", False: "normalised values"}
        raise ValueError(f"{model_uri} was trained on {kind[model_raw]} but store {store_uri} "
                         f"holds {kind[bool(store.raw_counts)]}")
    cols = _gene_map(embedder, store, model_uri)
    pathways = hasattr(embedder, "pathway_ids")
    dims = {"latent": embedder.dim, **({"pathway_activity": len(embedder.pathway_ids)}
                                       if pathways else {})}
    attrs = {"model_uri": model_uri, "model_version": f"models:/{pulled.name}/{pulled.version}",
             "store_uri": store_uri, "store_fingerprint": store.fingerprint, "seed": seed,
             "rows": "store rows, in order",
             **({"pathway_ids": embedder.pathway_ids, "pathway_names": embedder.pathway_names}
                if pathways else {})}

    groups = codes = moments = None
    obs_columns = [c for c in (perturbation_column, covariate_column) if c]
    obs = None
    if perturbation_column:
        from pertscale.data.perturbation import PerturbationConfig, _group_cells

        if not pathways:
            raise ValueError(f"--perturbation-column: {model_uri} ({spec.name}) has no pathway "
                             f"activities to compare")
        obs = store.read_obs(obs_columns)
        cfg = PerturbationConfig(perturbation_column=perturbation_column,
                                 control_labels=list(control_labels),
                                 covariate_column=covariate_column)
        codes, table, _, _ = _group_cells(obs, cfg, store_uri)
        control_of = {cov: i for i, (cov, ctrl) in
                      enumerate(zip(table["covariate"], table["is_control"])) if ctrl}
        groups = pd.DataFrame({"perturbation": table["perturbation"].to_numpy(),
                               "covariate": table["covariate"].to_numpy(),
                               "is_control": table["is_control"].to_numpy()})
        groups["control"] = [-1 if c else control_of[cov]
                             for cov, c in zip(groups["covariate"], groups["is_control"])]
        moments = GroupMoments(len(groups), len(embedder.pathway_ids))
    if out.suffix == ".h5ad" and obs is None:
        obs = store.read_obs(obs_columns)
    if out.suffix == ".h5ad":
        obs = obs.copy()
        obs.index = obs.index.astype(str)

    writer = _Writer(out, store.n_cells, dims, attrs, obs, key=f"X_{spec.name}")
    ok = False
    try:
        for start in range(0, store.n_cells, batch_size):
            stop = min(store.n_cells, start + batch_size)
            latent, act = _encode(embedder, store.read_csr(start, stop), cols, seed)
            writer.write(start, {"latent": latent, **({"pathway_activity": act}
                                                      if act is not None else {})})
            if moments is not None:
                moments.add(codes[start:stop], act)
        ok = True
    finally:
        writer.close(ok)
    result: dict[str, Any] = {"out": str(out), "n_cells": store.n_cells, **dims, "table": None}
    if moments is None:
        return result
    table = discrepancy_table(moments, groups, embedder.pathway_ids, embedder.pathway_names)
    stem = out.with_suffix("")
    table_path, plot_path = Path(f"{stem}.discrepancy.tsv"), Path(f"{stem}.discrepancy.png")
    table.to_csv(table_path, sep="\t", index=False)
    fig = plot_discrepancy(table)
    fig.savefig(plot_path, dpi=120)
    result.update(table=table, table_path=str(table_path), plot_path=str(plot_path))
    if log_run:
        from pertscale.tracking import RunLogger

        logger = RunLogger(TrackingConfig(uri=tracking_uri, experiment="pertscale-embed"),
                           run_name=f"embed-{pulled.name}-{pulled.version}",
                           tags={"job": "embed", "model_uri": attrs["model_version"],
                                 "store_uri": store_uri, "store_fingerprint": store.fingerprint})
        logger.log_params({"model": model_uri, "store": store_uri, "out": str(out),
                           "perturbation_column": perturbation_column,
                           "covariate_column": covariate_column, "n_cells": store.n_cells})
        logger.log_artifact(table_path, "discrepancy")
        logger.log_figure(fig, "discrepancy/discrepancy.png")
        logger.end("FINISHED")
        result["mlflow_run_id"] = logger.run_id
    import matplotlib.pyplot as plt

    plt.close(fig)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pertscale embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--store", required=True, help="cell store (path or URI) to embed")
    parser.add_argument("--out", required=True, help="output .zarr or .h5ad (must not exist)")
    parser.add_argument("--batch-size", type=int, default=1024, help="cells per batch")
    parser.add_argument("--perturbation-column", default="",
                        help="obs column of perturbation labels: also write the pathway activity "
                             "discrepancy table against control")
    parser.add_argument("--control-labels", default="ctrl,control",
                        help="comma-separated labels of control cells")
    parser.add_argument("--covariate-column", default="",
                        help="obs column whose values each have their own control (e.g. "
                             "cell_type); default: all controls pooled")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the gene sampling of cells longer than max_seq_len")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or storage/mlflow)")
    parser.add_argument("--no-log", action="store_true", help="do not log an MLflow run")
    args = parser.parse_args(argv)
    result = embed_store(args.model, args.store, args.out, batch_size=args.batch_size,
                         perturbation_column=args.perturbation_column,
                         control_labels=tuple(s.strip() for s in args.control_labels.split(",")
                                              if s.strip()),
                         covariate_column=args.covariate_column, seed=args.seed,
                         tracking_uri=args.tracking_uri, log_run=not args.no_log)
    print(f"wrote {result['n_cells']} cells: latent [{result['latent']}]"
          + (f", pathway activity [{result['pathway_activity']}]"
             if "pathway_activity" in result else "") + f" to {result['out']}")
    table = result["table"]
    if table is not None:
        top = table.iloc[np.argsort(-table["cohens_d"].abs().to_numpy(), kind="stable")[:20]]
        print("the 20 largest discrepancies (all in the table):")
        print(top[["perturbation", "covariate", "rank", "pathway_id", "pathway_name",
                   "cohens_d", "q"]].to_string(index=False, max_colwidth=40,
                                               float_format=lambda v: f"{v:.3g}"))
        print(f"\ntable: {result['table_path']}\nplot: {result['plot_path']}")
    return 0
