"""Collections: several member stores read as one, in one union gene space.

Layout: a parent zarr group whose attributes list the members (relative paths, usually
`members/<name>`, each a complete store) and the union gene vocabulary (first-seen order, so the
first member's genes keep their indices). Cells are the members' cells in member order. Reading
maps each member's gene indices into the union space; rows come back with sorted indices.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import tensorstore as ts
from pandas.api.types import union_categoricals

from pertscale.store.format import (
    COLLECTION_NAME,
    FORMAT_VERSION,
    StoreError,
    group_meta,
    join_uri,
    local_path,
    open_kvstore,
    write_json,
)
from pertscale.store.reader import CellStore, open_store
from pertscale.store.vocab import GeneVocab, union_genes

__all__ = ["DATASET_COLUMN", "CellCollection", "write_collection"]

log = logging.getLogger(__name__)

OPEN_THREADS = 16  # members opened at once
DATASET_COLUMN = "dataset"  # obs column naming each cell's member (added when members lack it)


def _member_name(path: str) -> str:
    """members/003-kang2018 -> kang2018 (the input file's stem)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    head, _, rest = name.partition("-")
    return rest if head.isdigit() and rest else name


def write_collection(uri: str, member_paths: list[str]) -> dict[str, Any]:
    """Commit a collection at `uri` over complete member stores at `uri`/<member path>.
    Returns the root attributes."""
    if not member_paths:
        raise ValueError("a collection needs at least one member store")
    members = []
    for path in member_paths:
        store = open_store(join_uri(uri, path))
        if not isinstance(store, CellStore):
            raise StoreError(f"collection member {path} is itself a collection")
        members.append((path, store))
    raw = {s.raw_counts for _, s in members}
    if len(raw) > 1:
        kinds = {p: "raw counts" if s.raw_counts else "normalised" for p, s in members}
        raise ValueError(f"collection members mix raw counts and normalised values: {kinds}")
    genes = union_genes(s.var.index for _, s in members)
    fp = hashlib.sha256("".join(s.fingerprint for _, s in members).encode()).hexdigest()
    attrs = {
        "pertscale_format": COLLECTION_NAME, "format_version": FORMAT_VERSION,
        "members": [{"path": p, "n_cells": s.n_cells, "fingerprint": s.fingerprint,
                     "source": s.attrs.get("source", {})} for p, s in members],
        "genes": genes,
        "n_cells": sum(s.n_cells for _, s in members), "n_genes": len(genes),
        "nnz": sum(s.nnz for _, s in members), "raw_counts": raw.pop(),
        "fingerprint": fp, "complete": True,
    }
    if local_path(uri) is None:
        raise StoreError(f"collection {uri!r}: collections are written to a local path")
    write_json(open_kvstore(uri), "zarr.json", group_meta(attrs))
    return attrs


class _MultiFuture:
    """Reads of several members' row ranges; `.result()` stacks them in the union space."""

    def __init__(self, parts: list[tuple[Any, np.ndarray]], n_genes: int, n_rows: int):
        self._parts, self._n_genes, self._n_rows = parts, n_genes, n_rows

    def done(self) -> bool:
        return all(f.done() for f, _ in self._parts)

    def result(self) -> sp.csr_matrix:
        if not self._parts:
            return sp.csr_matrix((self._n_rows, self._n_genes), dtype=np.float32)
        blocks = []
        for future, to_union in self._parts:
            csr = future.result()
            out = sp.csr_matrix((csr.data, to_union[csr.indices], csr.indptr),
                                shape=(csr.shape[0], self._n_genes))
            out.sort_indices()
            blocks.append(out)
        out = blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")
        out.indices = out.indices.astype(np.int32, copy=False)
        return out


class CellCollection:
    """Member stores read as one store in the union gene space (same API as CellStore)."""

    def __init__(self, uri: str, attrs: dict[str, Any], *, cache_bytes: int = 64 << 20):
        self.uri = uri
        self.attrs = attrs
        # NOTE: one tensorstore context (one cache pool) for all members, opened concurrently
        context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})

        def open_member(m: dict[str, Any]) -> CellStore:
            store = open_store(join_uri(uri, m["path"]), context=context)
            if store.fingerprint != m["fingerprint"]:
                raise StoreError(f"collection {uri}: member {m['path']} changed after the "
                                 "collection was written (fingerprint mismatch)")
            return store

        with concurrent.futures.ThreadPoolExecutor(OPEN_THREADS) as pool:
            self.members = list(pool.map(open_member, attrs["members"]))
        self.member_paths = [m["path"] for m in attrs["members"]]
        self.n_cells = int(attrs["n_cells"])
        self.n_genes = int(attrs["n_genes"])
        self.nnz = int(attrs["nnz"])
        self.raw_counts = bool(attrs["raw_counts"])
        self.fingerprint = str(attrs["fingerprint"])
        self.vocab = GeneVocab(attrs["genes"])
        pos = {g: i for i, g in enumerate(self.vocab.genes)}
        self.gene_maps = [np.array([pos[g] for g in s.var.index], dtype=np.int32)
                          for s in self.members]
        self.cell_offsets = np.cumsum([0] + [s.n_cells for s in self.members])
        self._nnz_offsets = np.cumsum([0] + [s.nnz for s in self.members])

    def __repr__(self) -> str:
        return (f"CellCollection({self.uri!r}, {len(self.members)} members, "
                f"n_cells={self.n_cells}, n_genes={self.n_genes})")

    def __len__(self) -> int:
        return self.n_cells

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_cells:
            raise ValueError(f"cell range [{start}, {stop}) is outside [0, {self.n_cells}) "
                             f"of collection {self.uri}")
        return start, stop

    def read_csr_async(self, start: int, stop: int) -> _MultiFuture:
        start, stop = self._check_range(start, stop)
        parts = []
        for i, store in enumerate(self.members):
            lo = max(start, self.cell_offsets[i])
            hi = min(stop, self.cell_offsets[i + 1])
            if lo < hi:
                off = self.cell_offsets[i]
                parts.append((store.read_csr_async(lo - off, hi - off), self.gene_maps[i]))
        return _MultiFuture(parts, self.n_genes, stop - start)

    def read_csr(self, start: int, stop: int) -> sp.csr_matrix:
        return self.read_csr_async(start, stop).result()

    def read_indptr(self, start: int, stop: int) -> np.ndarray:
        """int64 row pointers of cells [start, stop] in the collection's nonzero order."""
        start, stop = self._check_range(start, stop)
        parts = []
        for i, store in enumerate(self.members):
            a, b = max(start, self.cell_offsets[i]), min(stop, self.cell_offsets[i + 1] - 1)
            if a <= b:
                off = self.cell_offsets[i]
                parts.append(store.read_indptr(a - off, b - off) + self._nnz_offsets[i])
        if stop == self.n_cells:
            parts.append(np.array([self.nnz], np.int64))
        return np.concatenate(parts)

    @functools.cached_property
    def var(self) -> pd.DataFrame:
        """Union genes; gene_symbol from the first member that has the gene."""
        symbols = {}
        for store in reversed(self.members):
            symbols.update(zip(store.var.index, store.var["gene_symbol"]))
        genes = self.vocab.genes
        return pd.DataFrame({"gene_symbol": [symbols[g] for g in genes]},
                            index=pd.Index(genes, dtype=object))

    @functools.cached_property
    def obs(self) -> pd.DataFrame:
        """Members' obs concatenated (categories unioned); a "dataset" column names the member
        of each cell where the members do not carry one."""
        return self.read_obs()

    @functools.cached_property
    def obs_column_names(self) -> list[str]:
        """Union of the members' obs columns, and the "dataset" column."""
        names = [c for s in self.members for c in s.obs_column_names]
        return list(dict.fromkeys([*names, DATASET_COLUMN]))

    def read_obs(self, columns: list[str] | None = None, *, index: bool = True) -> pd.DataFrame:
        """Members' obs (only `columns`, None = all; cell ids only when `index`), concatenated
        with categories unioned."""
        frames = []
        for path, store in zip(self.member_paths, self.members):
            own = None if columns is None else [c for c in columns
                                                 if c in store.obs_column_names]
            obs = store.read_obs(own, index=index)
            if DATASET_COLUMN not in obs.columns and (columns is None or DATASET_COLUMN in columns):
                obs[DATASET_COLUMN] = _member_name(path)
            frames.append(obs)
        out = _concat_obs(frames)
        if not index:
            return out.set_axis(pd.RangeIndex(len(out)))
        if out.index.has_duplicates:
            # NOTE: collections share barcodes (CELLxGENE); ids are unique within a member
            # (the writer refuses duplicates), so "<member>:<id>" is unique in the collection.
            names = [_member_name(p) for p in self.member_paths]
            if len(set(names)) < len(names):
                names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.member_paths]
            out.index = pd.Index([f"{name}:{i}" for name, f in zip(names, frames)
                                  for i in f.index.astype(str)], dtype=object)
            log.info("collection %s: cell ids repeat across members; obs ids are prefixed "
                     "with the member name (<member>:<id>)", self.uri)
        return out

    def read_stats(self) -> dict[str, np.ndarray]:
        """Per-gene statistics summed over members in the union gene space."""
        out = {k: np.zeros(self.n_genes) for k in
               ("sum", "sum_sq", "seurat_sum", "seurat_sum_sq")}
        out["nnz"] = np.zeros(self.n_genes, np.int64)
        for store, to_union in zip(self.members, self.gene_maps):
            for k, v in store.read_stats().items():
                np.add.at(out[k], to_union, v)
        return out

    def gene_stats(self) -> pd.DataFrame:
        s = self.read_stats()
        return pd.DataFrame({"sum": s["sum"], "sum_sq": s["sum_sq"], "nnz": s["nnz"]},
                            index=self.var.index)


def _concat_obs(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Row-concatenate member obs tables; string/categorical columns share unioned categories."""
    columns = list(dict.fromkeys(c for f in frames for c in f.columns))
    dtypes = {}
    for c in columns:
        present = [f[c] for f in frames if c in f.columns]
        if all(pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype)
               for s in present):
            continue
        union = union_categoricals([s if isinstance(s.dtype, pd.CategoricalDtype)
                                    else s.astype("category") for s in present],
                                   ignore_order=True)
        dtypes[c] = pd.CategoricalDtype(list(union.categories))
        for f in frames:
            if c in f.columns:
                f[c] = f[c].astype(object).astype(dtypes[c])
    out = pd.concat(frames, axis=0)
    for c, dtype in dtypes.items():
        out[c] = out[c].astype(object).astype(dtype)
    return out
