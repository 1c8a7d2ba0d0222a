"""Reading cell stores through tensorstore: `open_store(uri)` -> CellStore (or CellCollection).

`read_csr_async(start, stop)` reads the row pointers of cells [start, stop] (through the
tensorstore cache: the whole X/indptr is never held, so memory does not grow with the store)
and issues the `X/indices` and `X/data` reads for their nonzeros as tensorstore futures, so
many block reads can be in flight at once (the loader overlaps them with compute).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import tensorstore as ts

from pertscale.store.format import (
    COLLECTION_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_COLUMN,
    STATS_DIR_V1,
    X_DATA,
    X_INDICES,
    X_INDPTR,
    StoreError,
    array_spec,
    content_fingerprint,
    decode_column,
    kvstore_spec,
    metadata_keys,
    open_kvstore,
    read_json,
    read_strings,
    remote_endpoint,
    wait,
)
from pertscale.store.vocab import GeneVocab

__all__ = ["CellStore", "CsrFuture", "open_store", "read_store_attrs"]

DEFAULT_CACHE_BYTES = 64 << 20  # tensorstore cache: shard indices and recently read chunks


def read_store_attrs(uri: str) -> dict[str, Any]:
    """Root attributes of the store or collection at `uri`; StoreError when it is missing,
    of another format or incomplete."""
    try:
        kv = open_kvstore(uri)
        meta = read_json(kv, "zarr.json")
    except (ValueError, OSError) as e:
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"cannot open store {uri}: {e}") from e
    if meta is None:
        raise StoreError(f"no store at {uri} (zarr.json not found)")
    attrs = meta.get("attributes", {})
    kind = attrs.get("pertscale_format")
    if kind not in (FORMAT_NAME, COLLECTION_NAME):
        raise StoreError(f"{uri} is a zarr group but not a pertscale store "
                         f"(pertscale_format={kind!r})")
    if attrs.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(f"store {uri} has format version {attrs['format_version']}; this "
                         f"pertscale reads up to {FORMAT_VERSION}")
    if not attrs.get("complete", False):
        raise StoreError(f"store {uri} is incomplete: its writer stopped before the commit "
                         "(an ingest that was interrupted or refused its input); rerun the "
                         "ingest to write it")
    return attrs


def open_store(uri: Any, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
               context: ts.Context | None = None) -> CellStore:
    """Open a committed store or collection at a local path, s3:// or gs:// uri. `context`:
    a tensorstore context to share (its cache pool bounds the cache of every store using it);
    default: a new one with a `cache_bytes` pool."""
    uri = str(uri)
    attrs = read_store_attrs(uri)
    if attrs["pertscale_format"] == COLLECTION_NAME:
        from pertscale.store.collection import CellCollection
        return CellCollection(uri, attrs, cache_bytes=cache_bytes)
    return CellStore(uri, attrs, cache_bytes=cache_bytes, context=context)


class CsrFuture:
    """Pending read of cells [start, stop); `.result()` assembles the csr_matrix.

    The row pointers are read first (asynchronously); when they arrive, a tensorstore callback
    issues the X/indices and X/data reads of their nonzeros, so no call blocks before
    `result()` and many reads stay in flight."""

    def __init__(self, store: CellStore, start: int, stop: int):
        self._n_genes, self._n = store.n_genes, stop - start
        self._where = f"store {store.uri}: reading cells [{start}, {stop})"
        self._endpoint = store._endpoint
        self._issued: concurrent.futures.Future = concurrent.futures.Future()

        def issue(ptr_future: Any) -> None:
            try:
                ptr = ptr_future.result().astype(np.int64, copy=False)
                lo, hi = int(ptr[0]), int(ptr[-1])
                reads = ((store._indices[lo:hi].read(), store._data[lo:hi].read())
                         if hi > lo else None)
                self._issued.set_result((ptr - lo, reads))
            except BaseException as e:  # noqa: BLE001 - handed to result()
                self._issued.set_exception(e)

        store._indptr[start:stop + 1].read().add_done_callback(issue)

    def done(self) -> bool:
        if not self._issued.done():
            return False
        if self._issued.exception() is not None:
            return True
        reads = self._issued.result()[1]
        return reads is None or all(f.done() for f in reads)

    def result(self) -> sp.csr_matrix:
        try:
            indptr, reads = wait(self._issued, self._endpoint)
            if reads is None:
                indices, data = np.zeros(0, np.int32), np.zeros(0, np.float32)
            else:
                indices, data = wait(reads[0], self._endpoint), wait(reads[1], self._endpoint)
        except StoreError:
            raise
        except ValueError as e:  # a failed checksum, a missing or unreadable shard
            raise StoreError(f"{self._where}: {e} (run `pertscale verify` on the store)") from e
        return sp.csr_matrix((data, indices, indptr), shape=(self._n, self._n_genes), copy=False)


class CellStore:
    """A committed cell store (format v2 or v1). Attributes follow the store contract in
    DESIGN.md."""

    def __init__(self, uri: str, attrs: dict[str, Any], *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 context: ts.Context | None = None):
        self.uri = uri
        self.attrs = attrs
        self.n_cells = int(attrs["n_cells"])
        self.n_genes = int(attrs["n_genes"])
        self.nnz = int(attrs["nnz"])
        self.raw_counts = bool(attrs["raw_counts"])
        self.format_version = int(attrs.get("format_version", 1))
        self._tables: dict[str, dict[str, Any]] = {}
        self._kv_spec = kvstore_spec(uri)
        self._endpoint = remote_endpoint(self._kv_spec)  # None: local, no time limit
        self._context = context if context is not None else ts.Context(
            {"cache_pool": {"total_bytes_limit": cache_bytes}})
        # the store root as a key-value store, in the same context (documents, string chunks)
        self._kv = wait(ts.KvStore.open(self._kv_spec, context=self._context), self._endpoint)
        self._indices = self._open(X_INDICES)
        self._data = self._open(X_DATA)
        self._indptr = self._open(X_INDPTR)
        n = int(self._indptr.shape[0])
        last = int(self._read(self._indptr[n - 1:n], X_INDPTR)[0]) if n else -1
        if n != self.n_cells + 1 or last != self.nnz:
            raise StoreError(f"store {uri}: X/indptr ({n} entries, last {last}) disagrees "
                             f"with n_cells={self.n_cells}, nnz={self.nnz}")

    @functools.cached_property
    def fingerprint(self) -> str:
        """The content fingerprint (the lineage key) of the store as it is now: the committed
        root attributes with the sha256 of every metadata document recomputed, so an edited
        obs/var/stats document changes it (shard contents are checked by crc32c on every read
        and by `verify`)."""
        kv = self._kv
        current = {key: hashlib.sha256(bytes(wait(kv.read(key), self._endpoint).value))
                   .hexdigest() for key in metadata_keys(kv)}
        return content_fingerprint({**self.attrs, "metadata": current})

    def __repr__(self) -> str:
        kind = "raw counts" if self.raw_counts else "normalised values"
        return (f"CellStore({self.uri!r}, n_cells={self.n_cells}, n_genes={self.n_genes}, "
                f"nnz={self.nnz}, {kind})")

    def __len__(self) -> int:
        return self.n_cells

    def _open(self, path: str) -> ts.TensorStore:
        spec = array_spec(self._kv_spec, path, np.float32, shard_values=1, chunk_values=1,
                          create=False)
        # NOTE: every chunk of a committed store exists; a missing one is an error, not zeros
        # (tensorstore's default fills missing chunks with the fill value).
        spec["fill_missing_data_reads"] = False
        # NOTE: a committed store never changes: cached chunks need no revalidation per read
        spec["recheck_cached_data"] = "open"
        spec["recheck_cached_metadata"] = "open"
        try:
            return wait(ts.open(spec, open=True, read=True, context=self._context),
                        self._endpoint)
        except ValueError as e:
            raise StoreError(f"store {self.uri}: cannot open array {path}: {e}") from e

    def read_array(self, path: str) -> np.ndarray:
        """The whole 1-D array at `path` inside the store (metadata tables, statistics)."""
        return self._read(self._open(path), path)

    def _read(self, view: ts.TensorStore, path: str) -> np.ndarray:
        try:
            return wait(view.read(), self._endpoint)
        except StoreError:
            raise
        except ValueError as e:
            raise StoreError(f"store {self.uri}: cannot read array {path}: {e}") from e

    def read_indptr(self, start: int, stop: int) -> np.ndarray:
        """int64 row pointers of cells [start, stop]: stop - start + 1 entries."""
        start, stop = self._check_range(start, stop)
        return self._read(self._indptr[start:stop + 1], X_INDPTR).astype(np.int64, copy=False)

    # --- cells -----------------------------------------------------------------------------
    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_cells:
            raise ValueError(f"cell range [{start}, {stop}) is outside [0, {self.n_cells}) "
                             f"of store {self.uri}")
        return start, stop

    def read_csr_async(self, start: int, stop: int) -> CsrFuture:
        """Start reading cells [start, stop); returns a CsrFuture (`.result()` -> csr_matrix)."""
        start, stop = self._check_range(start, stop)
        return CsrFuture(self, start, stop)

    def read_csr(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells [start, stop) as a float32 csr_matrix [stop - start, n_genes]."""
        return self.read_csr_async(start, stop).result()

    # --- tables ----------------------------------------------------------------------------
    def _read_table(self, group: str, columns: list[str] | None = None, *,
                    index: bool = True) -> pd.DataFrame:
        """The table `group` (obs / var): all columns or only `columns`, with its index (ids)
        or a RangeIndex; only the arrays of what is asked for are read and decoded."""
        attrs = self._table_attrs(group)
        names = list(self._column_names(group)) if columns is None else list(columns)
        missing = [c for c in names if c not in self._column_names(group)]
        if missing:
            raise ValueError(f"{group} column(s) {missing} not in store {self.uri}; it has "
                             f"{list(self._column_names(group))}")
        if self.format_version == 1:
            read = lambda name: self.read_array(f"{group}/{name}")
            column = lambda name: decode_column(attrs["encodings"][name], read, name)
        else:
            column = lambda name: self._anndata_column(f"{group}/{name}")
        cols = {name: column(name) for name in names}
        if not index:
            n = self.n_cells if group == "obs" else self.n_genes
            return pd.DataFrame(cols, index=pd.RangeIndex(n))
        ids = pd.Index(column(attrs.get("_index", attrs.get("index", INDEX_COLUMN))),
                       dtype=object)
        return pd.DataFrame(cols, index=ids)

    def _anndata_column(self, path: str) -> Any:
        """A column in AnnData's encodings (format v2): array, string-array or categorical."""
        kv = self._kv
        meta = read_json(kv, f"{path}/zarr.json")
        if meta is None:
            raise StoreError(f"store {self.uri}: cannot open array {path} ({path}/zarr.json is "
                             "missing)")
        kind = meta.get("attributes", {}).get("encoding-type")
        if kind == "array":
            return self.read_array(path)
        if kind == "string-array":
            return read_strings(kv, path)
        if kind == "categorical":
            codes = self._anndata_column(f"{path}/codes").astype(np.int32, copy=False)
            categories = pd.Index(self._anndata_column(f"{path}/categories"))
            return pd.Categorical.from_codes(codes, categories=categories,
                                             ordered=bool(meta["attributes"].get("ordered")))
        raise StoreError(f"store {self.uri}: {path} has encoding {kind!r}, which pertscale "
                         "does not read (array, string-array, categorical)")

    def _table_attrs(self, group: str) -> dict[str, Any]:
        if group not in self._tables:  # a committed store never changes
            meta = read_json(self._kv, f"{group}/zarr.json")
            if meta is None:
                raise StoreError(f"store {self.uri}: {group}/zarr.json is missing")
            self._tables[group] = meta["attributes"]
        return self._tables[group]

    def _column_names(self, group: str) -> list[str]:
        attrs = self._table_attrs(group)
        return list(attrs["columns"] if self.format_version == 1 else attrs["column-order"])

    @functools.cached_property
    def obs_column_names(self) -> list[str]:
        """Names of the obs columns (from obs/zarr.json; nothing decoded)."""
        return self._column_names("obs")

    def read_obs(self, columns: list[str] | None = None, *, index: bool = True) -> pd.DataFrame:
        """obs with only `columns` (None = all), and without the cell ids when not `index`:
        what a loader rank needs, without decoding the rest."""
        return self._read_table("obs", columns, index=index)

    @functools.cached_property
    def obs(self) -> pd.DataFrame:
        """Cell metadata: one row per cell (index = cell ids), categoricals as Categorical."""
        return self._read_table("obs")

    @functools.cached_property
    def var(self) -> pd.DataFrame:
        """Gene metadata: index = gene ids, column "gene_symbol" and any carried-over columns."""
        return self._read_table("var")

    @functools.cached_property
    def vocab(self) -> GeneVocab:
        return GeneVocab(list(self.var.index))

    def read_stats(self) -> dict[str, np.ndarray]:
        """Per-gene statistics accumulated at ingest (see stats/zarr.json for definitions)."""
        fields = ("sum", "sum_sq", "nnz", "seurat_sum", "seurat_sum_sq")
        where = self.attrs.get("stats", STATS_DIR_V1)
        return {f: self.read_array(f"{where}/{f}") for f in fields}

    def gene_stats(self) -> pd.DataFrame:
        """Per-gene sum, sum of squares and nonzero count of the stored values."""
        s = self.read_stats()
        return pd.DataFrame({"sum": s["sum"], "sum_sq": s["sum_sq"], "nnz": s["nnz"]},
                            index=self.var.index)
