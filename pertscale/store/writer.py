"""StoreWriter: write a cell store row block by row block, committed atomically on exit.

    with StoreWriter(out, var=var_df, raw_counts=True, source={"file": ..., "sha256": ...}) as w:
        w.append(csr_block, obs_df)

Each block is validated (shape, finite values; for raw counts also non-negative integers),
stripped of explicit zeros, sorted, and added to the CSR arrays; per-gene statistics and the
per-cell `n_counts` obs column are accumulated on the way. The root `zarr.json` says
`"complete": false` from the first byte written and `true` only after every shard is written and
hashed: a store whose writer died is refused by `open_store` as incomplete.

Replacing a complete store (`overwrite`): the new store is written beside it, in
`.<name>.pertscale-new`, and swapped in by two renames only once it is committed; a failure or
an interrupt before then removes the staging folder and leaves the old store as it was.

Integrity: the root attributes hold the sha256 of every shard file (`manifest`) and of every
metadata document below the root (`metadata`: group and array zarr.json, with the obs/var
encodings and categories); the fingerprint hashes all root attributes but provenance
(`content_fingerprint`), so an edited document or attribute changes it and fails `verify`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import pandas as pd
import scipy.sparse as sp

import pertscale
from pertscale.store.arrays import AppendArray, ColumnSink
from pertscale.store.format import (
    CODECS,
    DEFAULT_CHUNK_VALUES,
    DEFAULT_CODEC,
    DEFAULT_COMPRESSION_LEVEL,
    DEFAULT_SHARD_VALUES,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_COLUMN,
    N_COUNTS,
    STATS_DIR,
    TABLE_SHARD_VALUES,
    X_DATA,
    X_INDICES,
    X_INDPTR,
    StoreError,
    anndata_encoding,
    content_fingerprint,
    group_meta,
    kvstore_spec,
    local_path,
    metadata_keys,
    open_kvstore,
    read_json,
    read_strings,
    write_json,
)
from pertscale.store.unique import IdHashes

__all__ = ["SEURAT_TARGET_SUM", "StoreWriter", "begin_replacement", "prepare_output", "swap_in"]

SEURAT_TARGET_SUM = 1e4  # normalize_total target of the accumulated "seurat" statistics
MAX_EXACT_COUNT = 2 ** 24  # float32 holds every integer up to here exactly
log = logging.getLogger(__name__)
ID_SCRATCH = ".pertscale-ids"  # inside the store being written; removed before the commit


def staging_path(final: Path) -> Path:
    """Where a replacement of the store at `final` is written before the swap."""
    return final.parent / f".{final.name}.pertscale-new"


def _store_kind(path: Path) -> str | None:
    """The pertscale_format of a store or collection rooted at `path`, else None."""
    if not (path / "zarr.json").is_file():
        return None
    meta = read_json(open_kvstore(str(path)), "zarr.json") or {}
    kind = meta.get("attributes", {}).get("pertscale_format")
    return kind if kind in (FORMAT_NAME, "pertscale.collection") else None


def _remove_ours(path: Path) -> None:
    """Remove `path` if it is absent, empty or a pertscale store (ours); else an error."""
    if not path.exists():
        return
    meta = read_json(open_kvstore(str(path)), "zarr.json") if path.is_dir() else None
    kind = (meta or {}).get("attributes", {}).get("pertscale_format")
    if path.is_dir() and (kind in (FORMAT_NAME, "pertscale.collection") or not any(path.iterdir())):
        shutil.rmtree(path)
        return
    raise StoreError(f"{path} exists and was not written by pertscale; move it away")


def begin_replacement(final: Path) -> Path:
    """A fresh staging folder for a replacement of `final` (a leftover of ours is removed)."""
    staging = staging_path(final)
    _remove_ours(staging)
    staging.mkdir(parents=True)
    return staging


def swap_in(staging: Path, final: Path) -> None:
    """Replace the store at `final` by the committed one at `staging` (two renames)."""
    old = final.parent / f".{final.name}.pertscale-old"
    _remove_ours(old)
    final.rename(old)
    staging.rename(final)
    shutil.rmtree(old)


def prepare_output(uri: str, *, overwrite: bool) -> bool:
    """Make `uri` ready for a new store: absent, empty, an incomplete store (removed: a rerun
    restarts cleanly) or, with `overwrite`, a complete one, which is kept until its replacement
    is committed: returns True then (write to `begin_replacement`, then `swap_in`). Anything
    else is an error."""
    path = local_path(uri)
    if path is None:
        raise StoreError(f"output {uri!r}: stores are written to a local path; "
                         "upload the finished store to object storage")
    resolved = path.resolve()
    for parent in resolved.parents:
        kind = _store_kind(parent)
        member = kind == "pertscale.collection" and \
            resolved.relative_to(parent).parts[0] == "members"  # a collection's own member
        if kind is not None and not member:
            raise StoreError(f"output {path} is inside the store {parent}; write the new store "
                             f"outside it")
    if not path.exists():
        return False
    if not path.is_dir():
        raise StoreError(f"output {path} exists and is not a directory")
    if not any(path.iterdir()):
        return False
    meta = read_json(open_kvstore(str(path)), "zarr.json")
    attrs = (meta or {}).get("attributes", {})
    if attrs.get("pertscale_format") not in (FORMAT_NAME, "pertscale.collection"):
        raise StoreError(f"output {path} is a non-empty directory that is not a pertscale store; "
                         "refusing to write into it")
    if attrs.get("complete") and not overwrite:
        raise StoreError(f"output {path} already holds a complete store "
                         f"(source {attrs.get('source') or attrs.get('members')}); "
                         "pass --overwrite to replace it")
    if attrs.get("complete"):
        return True
    shutil.rmtree(path)
    return False


class StoreWriter:
    """Writes one cell store. See the module docstring; `append` any number of row blocks."""

    def __init__(self, out_uri: str | Path, *, var: pd.DataFrame, raw_counts: bool,
                 source: dict[str, Any] | None = None, overwrite: bool = False,
                 chunk_values: int = DEFAULT_CHUNK_VALUES,
                 shard_values: int = DEFAULT_SHARD_VALUES,
                 compression_level: int = DEFAULT_COMPRESSION_LEVEL,
                 codec: str = DEFAULT_CODEC,
                 extra_attrs: dict[str, Any] | None = None):
        self.uri = str(out_uri)
        self.raw_counts = bool(raw_counts)
        self.source = dict(source or {})
        name = self.source.get("path") or self.source.get("file")
        self._label = f"{name}: " if name else ""
        self.var = _check_var(var, self._label)
        self.n_genes = len(self.var)
        self._extra_attrs = dict(extra_attrs or {})
        if chunk_values < 1 or shard_values < chunk_values:
            raise ValueError(f"need 1 <= chunk_values ({chunk_values}) <= shard_values "
                             f"({shard_values})")
        if not 1 <= compression_level <= 22:
            raise ValueError(f"compression_level={compression_level} is outside [1, 22] (zstd)")
        if codec not in CODECS:
            raise ValueError(f"codec={codec!r} is not one of {list(CODECS)}")
        self._level = compression_level
        self._codec = codec
        final = Path(local_path(self.uri))
        self._replacing = final if prepare_output(self.uri, overwrite=overwrite) else None
        if self._replacing is not None:
            self._path = begin_replacement(final)
        else:
            self._path = final
            final.mkdir(parents=True, exist_ok=True)
        try:
            self._start(chunk_values, shard_values, codec)
        except BaseException:
            self._discard()
            raise

    def _start(self, chunk_values: int, shard_values: int, codec: str) -> None:
        self._kv = open_kvstore(str(self._path))
        self._kv_spec = kvstore_spec(str(self._path))
        self._root_attrs = {**anndata_encoding("anndata"), "pertscale_format": FORMAT_NAME,
                            "format_version": FORMAT_VERSION, "complete": False,
                            "source": self.source}
        write_json(self._kv, "zarr.json", group_meta(self._root_attrs))
        for group in ("X", "obs", "var", "uns", STATS_DIR):
            write_json(self._kv, f"{group}/zarr.json", group_meta())
        self._chunk = chunk_values
        # obs/var columns, indptr and statistics: smaller shards, still whole inner chunks
        self._table_shard = max(1, min(shard_values, TABLE_SHARD_VALUES) // chunk_values) \
            * chunk_values
        self._table_chunk = min(chunk_values, self._table_shard)
        self._open_x(shard_values, codec)
        self.n_cells = 0
        self.nnz = 0
        self.empty_cells = 0  # cells without a nonzero value (kept; said at close)
        # normalised values that are all integers look like raw counts (said at close)
        self.integers_only = not self.raw_counts
        self._obs_columns: list[str] | None = None
        self._obs: dict[str, ColumnSink] = {}
        g = self.n_genes
        self._stats = {name: np.zeros(g, np.float64) for name in
                       ("sum", "sum_sq", "seurat_sum", "seurat_sum_sq")}
        self._stats["nnz"] = np.zeros(g, np.int64)
        # duplicate cell ids across blocks are found at close (memory bounded: see unique.py)
        self._id_hashes = IdHashes(self._path / ID_SCRATCH)
        self._closed = False

    def _open_x(self, shard_values: int, codec: str) -> None:
        """The CSR arrays of X, empty (a migration links the old store's instead)."""
        self._indptr = self._array(X_INDPTR, np.int64, table=True)
        self._indices = self._array(X_INDICES, np.int32, shard_values=shard_values, codec=codec)
        self._data = self._array(X_DATA, np.float32, shard_values=shard_values, codec=codec)
        self._indptr.append(np.zeros(1, np.int64))

    def _close_x(self) -> dict[str, list[dict[str, Any]]]:
        """Finish the CSR arrays of X; their shard manifest."""
        manifest = {}
        for arr in (self._indptr, self._indices, self._data):
            arr.close()
            manifest[arr.path] = arr.manifest
        return manifest

    def _array(self, path: str, dtype: Any, *, table: bool = False,
               shard_values: int | None = None, codec: str = DEFAULT_CODEC,
               attributes: dict[str, Any] | None = None) -> AppendArray:
        return AppendArray(self._kv, self._kv_spec, path, dtype,
                           shard_values=self._table_shard if table else shard_values,
                           chunk_values=self._table_chunk if table else self._chunk,
                           compression_level=self._level, codec=codec, attributes=attributes)

    def _sink(self, group: str, name: str, first: pd.Series, strings: str) -> ColumnSink:
        return ColumnSink(self._kv, self._kv_spec, f"{group}/{name}", first, strings=strings,
                          shard_values=self._table_shard, chunk_values=self._table_chunk,
                          compression_level=self._level)

    # --- appending -------------------------------------------------------------------------
    def append(self, block: Any, obs: pd.DataFrame | None = None) -> None:
        """Add cells: `block` [cells, n_genes] (scipy sparse or dense), `obs` one row per cell."""
        if self._closed:
            raise RuntimeError("StoreWriter is closed")
        csr = self._check_block(block)
        if csr.shape[0]:
            self._write(csr, self._check_obs(obs, csr.shape[0]))

    def append_validated(self, csr: sp.csr_matrix, obs: pd.DataFrame) -> None:
        """Add cells that `validate` returned, in any order or grouping of its rows (the checks
        are per cell, so a reordering caller does not pay for them twice)."""
        if self._closed:
            raise RuntimeError("StoreWriter is closed")
        if csr.shape[0]:
            self._write(csr, obs)

    def _write(self, csr: sp.csr_matrix, obs: pd.DataFrame) -> None:
        got = [str(c) for c in obs.columns]
        if self._obs_columns is not None and got != self._obs_columns[:-1]:
            raise ValueError(f"{self._label}obs columns {got} differ from the first "
                             f"block's {self._obs_columns[:-1]}")
        row_sums = np.asarray(csr.sum(axis=1, dtype=np.float64)).reshape(-1)
        self.empty_cells += int(np.count_nonzero(np.diff(csr.indptr) == 0))
        self._accumulate(csr, row_sums)
        self._indices.append(csr.indices.astype(np.int32, copy=False))
        self._data.append(csr.data.astype(np.float32, copy=False))
        self._indptr.append(self.nnz + csr.indptr[1:].astype(np.int64))
        self.nnz += csr.nnz
        self._append_obs(obs.assign(**{N_COUNTS: row_sums}))

    def _append_obs(self, obs: pd.DataFrame) -> None:
        """The obs rows of cells just written to X (n_counts included)."""
        self._id_hashes.add(pd.util.hash_array(obs.index.astype(str).to_numpy(object)))
        if self._obs_columns is None:
            self._obs_columns = [str(c) for c in obs.columns]  # n_counts last
            self._obs[INDEX_COLUMN] = self._sink("obs", INDEX_COLUMN,
                                                 pd.Series(obs.index.astype(str)), "string")
            for c in self._obs_columns:
                self._obs[c] = self._sink("obs", c, obs[c], "categorical")
        self._obs[INDEX_COLUMN].append(pd.Series(obs.index.astype(str)))
        for c in self._obs_columns:
            self._obs[c].append(obs[c])
        self.n_cells += len(obs)

    def validate(self, block: Any, obs: pd.DataFrame | None, *,
                 first_row: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
        """The checks of `append` without writing, naming rows from `first_row` (a caller that
        reorders cells checks them in their source order): the cleaned CSR block and obs."""
        csr = self._check_block(block, first_row)
        return csr, self._check_obs(obs, csr.shape[0], first_row)

    def _check_block(self, block: Any, first_row: int | None = None) -> sp.csr_matrix:
        first_row = self.n_cells if first_row is None else first_row
        rows = f"rows {first_row}-{first_row + block.shape[0]}"
        if block.ndim != 2 or block.shape[1] != self.n_genes:
            raise ValueError(f"{self._label}block of shape {block.shape} does not match "
                             f"{self.n_genes} genes in var")
        csr = sp.csr_matrix(block, copy=True) if not sp.issparse(block) or block.format != "csr" \
            else block.copy()
        csr.sum_duplicates()
        csr.sort_indices()
        data = csr.data
        bad = ~np.isfinite(data)
        if self.raw_counts:
            with np.errstate(invalid="ignore"):
                bad |= (data < 0) | (data != np.round(data)) | (data > MAX_EXACT_COUNT)
            what = ("raw counts must be finite non-negative integers below 2**24 (use "
                    "--values normalised / raw_counts=False for normalised values)")
        else:
            what = "stored values must be finite"
            if self.integers_only:  # checked until the first block with a fraction
                with np.errstate(invalid="ignore"):
                    self.integers_only = bool(np.all(data == np.round(data)))
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            row = int(np.searchsorted(csr.indptr, k, side="right") - 1)
            gene = self.var.index[csr.indices[k]]
            raise ValueError(f"{self._label}{rows}: {what}; cell row {first_row + row}, "
                             f"gene {gene!r} has value {float(data[k])!r} "
                             f"({int(bad.sum())} bad values in this block)")
        csr.eliminate_zeros()
        return csr

    def _check_obs(self, obs: pd.DataFrame | None, n: int,
                   first_row: int | None = None) -> pd.DataFrame:
        first_row = self.n_cells if first_row is None else first_row
        if obs is None:
            obs = pd.DataFrame(index=pd.RangeIndex(first_row, first_row + n).astype(str))
        if len(obs) != n:
            raise ValueError(f"{self._label}obs has {len(obs)} rows for a block of {n} cells")
        ids = obs.index.astype(str)
        if ids.has_duplicates:
            _refuse_duplicates(self._label, ids[ids.duplicated(keep=False)])
        # NOTE: n_counts is the sum of the stored values; a source column of that name is kept
        # as n_counts_source rather than silently replaced.
        return obs.rename(columns={N_COUNTS: f"{N_COUNTS}_source"})

    def _accumulate(self, csr: sp.csr_matrix, row_sums: np.ndarray) -> None:
        scale = SEURAT_TARGET_SUM / np.where(row_sums > 0, row_sums, 1.0)
        s = self._stats
        _compiled_gene_stats_kernel()(csr.indptr.astype(np.int64, copy=False), csr.indices, csr.data,
                               scale, self.raw_counts, s["sum"], s["sum_sq"], s["nnz"],
                               s["seurat_sum"], s["seurat_sum_sq"])

    # --- commit ----------------------------------------------------------------------------
    def close(self) -> dict[str, Any]:
        """Finish every array, write statistics and var, then the final metadata (commit).
        Returns the root attributes."""
        if self._closed:
            raise RuntimeError("StoreWriter is already closed")
        self._closed = True
        if self.n_cells == 0:
            raise ValueError(f"{self._label}no cells were written to {self.uri}")
        manifest = self._close_x()
        for sink in self._obs.values():
            manifest.update(sink.close())
        self._check_unique_ids()
        if self.empty_cells:
            log.warning("%s%d of %d cells have no nonzero value (kept; their size factor is 0: "
                        "filter them, e.g. scanpy's filter_cells(min_counts=1), before "
                        "normalising)", self._label, self.empty_cells, self.n_cells)
        if self.integers_only and self.nnz:
            log.warning("%severy stored value is an integer: these look like raw counts, not "
                        "normalised values; if they are counts, ingest with --values raw_counts "
                        "(size factors, the negative binomial likelihood)", self._label)
        self._write_var(manifest)
        for name, values in self._stats.items():
            arr = self._array(f"{STATS_DIR}/{name}", values.dtype, table=True,
                              attributes=anndata_encoding("array"))
            arr.append(values)
            arr.close()
            manifest[arr.path] = arr.manifest
        # NOTE: the group documents of AnnData's on-disk specification (format v2)
        write_json(self._kv, "X/zarr.json", group_meta(
            {**anndata_encoding("csr_matrix"), "shape": [self.n_cells, self.n_genes]}))
        write_json(self._kv, "obs/zarr.json", group_meta(_dataframe_attrs(self._obs_columns)))
        write_json(self._kv, "var/zarr.json", group_meta(
            _dataframe_attrs([str(c) for c in self.var.columns])))
        write_json(self._kv, "uns/zarr.json", group_meta(anndata_encoding("dict")))
        write_json(self._kv, f"{STATS_DIR}/zarr.json", group_meta(
            {**anndata_encoding("dict"), "fields": list(self._stats), "seurat_values":
             f"normalize_total(target_sum={SEURAT_TARGET_SUM:g})" if self.raw_counts
             else "expm1(X)", "seurat_target_sum": SEURAT_TARGET_SUM}))
        metadata = {key: hashlib.sha256(bytes(self._kv.read(key).result().value)).hexdigest()
                    for key in metadata_keys(self._kv)}
        attrs = {
            **self._root_attrs, **self._extra_attrs,
            "n_cells": self.n_cells, "n_genes": self.n_genes, "nnz": self.nnz,
            "raw_counts": self.raw_counts, "value_dtype": "float32",
            "stats": STATS_DIR, "tool": f"pertscale {pertscale.__version__}",
            "manifest": manifest, "metadata": metadata, "complete": True,
        }
        attrs["fingerprint"] = content_fingerprint(attrs)
        # NOTE: the commit point. Shards were written by tensorstore's file driver (which
        # fsyncs); the root zarr.json is replaced atomically and only now says complete.
        write_json(self._kv, "zarr.json", group_meta(attrs))
        if self._replacing is not None:
            swap_in(self._path, self._replacing)
        return attrs

    def _check_unique_ids(self) -> None:
        """Cell ids are unique across blocks: equal 64-bit hashes are confirmed on the stored
        ids (read back only then) and real duplicates refused, naming them."""
        rows = self._id_hashes.shared_rows()
        self._id_hashes.close()
        if rows.size == 0:
            return
        ids = pd.Index(read_strings(self._kv, f"obs/{INDEX_COLUMN}", rows))
        if ids.has_duplicates:
            _refuse_duplicates(self._label, ids[ids.duplicated(keep=False)])

    def _write_var(self, manifest: dict[str, list[dict[str, Any]]]) -> None:
        var = self.var
        columns = [(INDEX_COLUMN, pd.Series(var.index.astype(str)))]
        columns += [(str(c), var[c].reset_index(drop=True)) for c in var.columns]
        for name, col in columns:
            sink = self._sink("var", name, col, "string")
            sink.append(col)
            manifest.update(sink.close())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self.close()
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        """After a failure: a replacement's staging folder is removed (the old store stays as
        it was); a new store stays incomplete (open_store refuses it, a rerun restarts)."""
        if hasattr(self, "_id_hashes"):
            self._id_hashes.close()
        if self._replacing is not None and self._path.exists():
            shutil.rmtree(self._path, ignore_errors=True)


def _dataframe_attrs(columns: list[str]) -> dict[str, Any]:
    """Attributes of an obs/var group: AnnData's dataframe encoding (ids in `_index`)."""
    return {**anndata_encoding("dataframe"), "_index": INDEX_COLUMN, "column-order": columns}


def _refuse_duplicates(label: str, duplicated: pd.Index) -> None:
    names = sorted(set(duplicated))
    raise ValueError(f"{label}cell id(s) {names[:5]} appear more than once ({len(names)} ids "
                     f"shared by {len(duplicated)} cells); cell ids must be unique (e.g. "
                     f"anndata's obs_names_make_unique() before ingest)")


def _gene_stats_kernel(indptr, indices, data, row_scale, raw_counts, total, total_sq, nnz,
                       seurat, seurat_sq):  # pragma: no cover - compiled by numba
    """One pass over a CSR block adding per-gene sums. The "seurat" sums are of the values
    scanpy's flavor="seurat" sees after its expm1: normalize_total(target_sum=1e4) of raw
    counts (x * row_scale), or expm1(x) of log-normalised values."""
    for row in range(indptr.size - 1):
        scale = row_scale[row]
        for k in range(indptr[row], indptr[row + 1]):
            g = indices[k]
            x = np.float64(data[k])
            total[g] += x
            total_sq[g] += x * x
            nnz[g] += 1
            v = x * scale if raw_counts else np.expm1(x)
            seurat[g] += v
            seurat_sq[g] += v * v


@functools.cache
def _compiled_gene_stats_kernel():
    # NOTE: numba is imported on first use so that readers (Ray workers) never pay for it.
    import numba

    return numba.njit(cache=True)(_gene_stats_kernel)


def _check_var(var: pd.DataFrame, label: str) -> pd.DataFrame:
    if not isinstance(var, pd.DataFrame):
        raise TypeError(f"var must be a pandas DataFrame, got {type(var).__name__}")
    if len(var) == 0:
        raise ValueError(f"{label}var has no genes")
    index = var.index.astype(str)
    empty = np.flatnonzero((index.str.strip() == "") | var.index.isna())
    if len(empty):
        raise ValueError(f"{label}{len(empty)} gene id(s) in var are empty, e.g. at var row "
                         f"{int(empty[0])}; every gene needs an id (set gene_id_column to a "
                         f"var column of ids)")
    dup = index[index.duplicated()]
    if len(dup):
        raise ValueError(f"{label}duplicate gene ids in var: {sorted(set(dup))[:10]} "
                         f"({len(dup)} duplicates)")
    var = var.copy()
    var.index = index
    if "gene_symbol" not in var.columns:
        var.insert(0, "gene_symbol", index)
    return var
