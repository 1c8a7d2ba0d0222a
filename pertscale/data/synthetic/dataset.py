"""A simulated Perturb-seq dataset in memory (`simulate`) or on disk (`write_dataset`).

Files written to DIR (byte-identical for the same config, seed and block size):
    cells.h5ad           raw counts, float32 CSR (written block by block: bounded memory);
                         obs perturbation / condition / perturbation_type / sign / cell_type /
                         batch / n_counts / n_genes, var index ENSGSIM ids + gene_symbol
    go_annotations.tsv   gene_symbol, go_id, evidence, ontology (direct annotations)
    go_terms.tsv         go_id, name, ontology
    go_dag_edges.tsv     child, parent, relation
    gene_sets.gmt        BP terms with propagated annotations (5-500 genes)
    gene_embeddings.npz  genes (symbols) [G], emb float32 [G, embedding_dim]
    truth.npz            every GroundTruth array (`load_truth` reads it back)
    manifest.json        config, seed, sizes, sha256 of every file (and the store, if any)
With `store_uri`, cells go into a pertscale cell store instead of cells.h5ad.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

import pertscale
from pertscale.checksums import file_sha256
from pertscale.data.synthetic.annotations import (
    GoAnnotations,
    build_gene_embeddings,
    build_go_annotations,
)
from pertscale.data.synthetic.cells import CHUNK_CELLS, CellDesign, build_design, simulate_blocks
from pertscale.data.synthetic.config import SimulatorConfig
from pertscale.data.synthetic.truth import GroundTruth, build_ground_truth

__all__ = [
    "FILES",
    "SimulatedData",
    "load_truth",
    "simulate",
    "write_dataset",
    "write_h5ad_blocks",
]

FILES = ("cells.h5ad", "go_annotations.tsv", "go_terms.tsv", "go_dag_edges.tsv",
         "gene_sets.gmt", "gene_embeddings.npz", "truth.npz", "manifest.json")
H5_CHUNK = 1 << 18  # values per HDF5 chunk of the appended X arrays


@dataclasses.dataclass
class SimulatedData:
    """A simulated screen: cells, ground truth, GO-like annotations and gene embeddings."""

    config: SimulatorConfig
    adata: ad.AnnData  # raw counts, obs / var as in cells.h5ad
    truth: GroundTruth
    design: CellDesign
    go: GoAnnotations
    embeddings: np.ndarray  # float32 [G, embedding_dim], rows = truth.gene_symbols


def simulate(cfg: SimulatorConfig, *, block_size: int = CHUNK_CELLS) -> SimulatedData:
    """Simulate everything in memory (for tests and small data; `write_dataset` streams)."""
    truth = build_ground_truth(cfg)
    design = build_design(cfg, truth)
    xs, obs = zip(*simulate_blocks(cfg, block_size, truth=truth, design=design))
    adata = ad.AnnData(X=sp.vstack(xs, format="csr"), obs=pd.concat(obs), var=truth.var())
    return SimulatedData(cfg, adata, truth, design, build_go_annotations(cfg, truth),
                         build_gene_embeddings(cfg, truth))


def write_h5ad_blocks(path: str | Path, blocks: Iterable[tuple[sp.csr_matrix, pd.DataFrame]],
                      var: pd.DataFrame, uns: dict[str, Any] | None = None) -> tuple[int, int]:
    """Write a CSR .h5ad from row blocks; X never sits in memory whole. Returns (n_cells, nnz)."""
    from anndata.io import sparse_dataset, write_elem

    obs_parts, nnz = [], 0
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "X", sp.csr_matrix((0, len(var)), dtype=np.float32),
                   dataset_kwargs={"chunks": (H5_CHUNK,)})
        # NOTE: scipy gives the empty matrix int32 row pointers; more than 2**31 values would
        # overflow them, so they are made int64 before the first append.
        del f["X/indptr"]
        f["X"].create_dataset("indptr", data=np.zeros(1, np.int64), maxshape=(None,),
                              chunks=(H5_CHUNK,))
        x_h5 = sparse_dataset(f["X"])
        for x, obs in blocks:
            x_h5.append(x)
            obs_parts.append(obs)
            nnz += x.nnz
        if not obs_parts:
            raise ValueError(f"{path}: no cells to write")
        obs = pd.concat(obs_parts)
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        write_elem(f, "uns", uns or {})
    return len(obs), nnz




def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez without the write-time timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asanyarray(arr), allow_pickle=False)


def _truth_arrays(truth: GroundTruth) -> dict[str, np.ndarray]:
    out = {}
    for field in dataclasses.fields(truth):
        value = getattr(truth, field.name)
        if field.name == "condition_genes":
            value = np.array([list(g) + [-1] * (2 - len(g)) for g in value], np.int32)
        out[field.name] = np.asarray(value)
    return out


def load_truth(path: str | Path) -> GroundTruth:
    """Read truth.npz written by `write_dataset` back into a GroundTruth."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground truth file {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        names = {f.name for f in dataclasses.fields(GroundTruth)}
        missing = sorted(names - set(z.files))
        if missing:
            raise ValueError(f"{path} is not a simulator truth file: missing arrays {missing}")
        kw: dict[str, Any] = {name: z[name] for name in names}
    for name in ("cell_types", "batches", "conditions", "interaction"):
        kw[name] = [str(v) for v in kw[name]]
    kw["condition_genes"] = [tuple(int(g) for g in row if g >= 0) for row in kw["condition_genes"]]
    return GroundTruth(**kw)


def _write_side_files(out: Path, cfg: SimulatorConfig, truth: GroundTruth) -> None:
    go = build_go_annotations(cfg, truth)
    go.annotations.to_csv(out / "go_annotations.tsv", sep="\t", index=False)
    go.terms.to_csv(out / "go_terms.tsv", sep="\t", index=False)
    go.dag.to_csv(out / "go_dag_edges.tsv", sep="\t", index=False)
    with (out / "gene_sets.gmt").open("w") as f:
        for go_id, (name, genes) in go.gene_sets.items():
            f.write("\t".join([go_id, name, *genes]) + "\n")
    _write_npz(out / "gene_embeddings.npz",
               {"genes": truth.gene_symbols, "emb": build_gene_embeddings(cfg, truth)})
    _write_npz(out / "truth.npz", _truth_arrays(truth))


def _write_store(store_uri: str, cfg: SimulatorConfig, truth: GroundTruth,
                 blocks: Iterable[tuple[sp.csr_matrix, pd.DataFrame]], overwrite: bool,
                 config_sha: str) -> dict[str, Any]:
    from pertscale.store import StoreWriter

    source = {"file": f"pertscale simulate (seed {cfg.seed})", "sha256": config_sha}
    with StoreWriter(store_uri, var=truth.var(), raw_counts=True, source=source,
                     overwrite=overwrite, extra_attrs={"simulation": cfg.to_dict()}) as w:
        for x, obs in blocks:
            w.append(x, obs)
    return {"uri": store_uri, "n_cells": w.n_cells, "nnz": w.nnz}


def write_dataset(cfg: SimulatorConfig, out_dir: str | Path | None, *,
                  block_size: int = CHUNK_CELLS, store_uri: str | None = None,
                  overwrite: bool = False, progress: Any = None,
                  num_threads: int = 1) -> dict[str, Any]:
    """Simulate and write the files listed in the module docstring to `out_dir`.

    The directory is assembled under a temporary name and renamed when complete, so a crash
    never leaves a half-written dataset. With `store_uri` the cells go into that store (the
    store's attributes hold the config) and `out_dir` may be None: then only the store is
    written. `progress(n_cells_done)` is called after each block; `num_threads` draws cells
    concurrently (same data for any value). Returns the manifest.
    """
    if out_dir is None:
        if store_uri is None:
            raise ValueError("write_dataset needs out_dir, store_uri or both")
        truth = build_ground_truth(cfg)
        config_sha = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()
        blocks = _with_progress(cfg, block_size, truth, progress, num_threads)
        store = _write_store(store_uri, cfg, truth, blocks, overwrite, config_sha)
        return {"tool": f"pertscale {pertscale.__version__} simulate", "seed": cfg.seed,
                "config": cfg.to_dict(), "config_sha256": config_sha, "n_cells": store["n_cells"],
                "n_genes": cfg.n_genes, "nnz": int(store["nnz"]),
                "n_conditions": len(truth.conditions), "store": store, "files": {}}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory; choose a folder")
    if out.exists() and any(out.iterdir()):
        if not _is_simulate_output(out):
            raise FileExistsError(f"output directory {out} is not empty and was not written by "
                                  f"pertscale simulate (no manifest.json of ours); refusing to "
                                  f"replace it: choose an empty or new folder")
        if not overwrite:
            raise FileExistsError(f"output directory {out} holds a simulated dataset; pass "
                                  f"overwrite=True (--overwrite) to replace it")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:  # named as the output the user gave, not our staging folder
        raise OSError(e.errno, e.strerror, str(out)) from None
    try:
        truth = build_ground_truth(cfg)
        config_json = json.dumps(cfg.to_dict(), sort_keys=True)
        config_sha = hashlib.sha256(config_json.encode()).hexdigest()

        blocks = _with_progress(cfg, block_size, truth, progress, num_threads)
        if store_uri is None:
            n_cells, nnz = write_h5ad_blocks(
                tmp / "cells.h5ad", blocks, truth.var(),
                uns={"simulation": {"config": config_json, "tool": "pertscale simulate"}})
            store = None
        else:
            store = _write_store(store_uri, cfg, truth, blocks, overwrite, config_sha)
            n_cells, nnz = store["n_cells"], store["nnz"]
        _write_side_files(tmp, cfg, truth)
        manifest = {
            "tool": f"pertscale {pertscale.__version__} simulate", "seed": cfg.seed,
            "config": cfg.to_dict(), "config_sha256": config_sha,
            "n_cells": n_cells, "n_genes": cfg.n_genes, "nnz": int(nnz),
            "n_conditions": len(truth.conditions), "store": store,
            "files": {p.name: file_sha256(p) for p in sorted(tmp.iterdir())},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _is_simulate_output(path: Path) -> bool:
    """True when `path` holds a dataset this command wrote (its manifest.json names the tool)
    and nothing the manifest does not list (a user's file beside it is never deleted)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    tool = str(manifest.get("tool", "")) if isinstance(manifest, dict) else ""
    if not (tool.startswith("pertscale") and tool.endswith("simulate")):
        return False
    ours = set(manifest.get("files", {})) | {"manifest.json"}
    return {p.name for p in path.iterdir()} <= ours


def _with_progress(cfg: SimulatorConfig, block_size: int, truth: GroundTruth, progress: Any,
                   num_threads: int):
    done = 0
    for x, obs in simulate_blocks(cfg, block_size, truth=truth, num_threads=num_threads):
        yield x, obs
        done += x.shape[0]
        if progress is not None:
            progress(done)
