"""Ingest .h5ad files into a cell store (one file) or a collection (several files).

The file is opened read-only with h5py and its matrix read through anndata's backed sparse
datasets in row blocks, so memory stays bounded by one block plus the writer's shard buffers,
whatever the file size. CSR and dense matrices are read block by block; a CSC matrix is
converted per block (correct, but each block reads every column: slow for large files).

A rerun of the same ingest (same file checksum and settings) on a complete store does nothing;
an interrupted one (incomplete store) restarts cleanly; a complete store of other data at the
output path is an error unless `overwrite`. For several inputs each member is one store under
`OUT/members/`, so an interrupted collection ingest resumes with the first unfinished member.

Order: cells are written in a seeded random order by default (`order = "shuffled"`, a two-pass
bucket shuffle in bounded memory, see shuffle.py): real files are sorted by perturbation, guide
or donor, and the loader's batches are only as mixed as the store's order. Each cell's row in
its file is kept in the obs column `source_row`, and the order and seed in the store's `source`
attributes, so a stored cell is traced to its file and row and the file's order is recovered by
sorting on `source_row`. `order = "source"` keeps the file's order (no `source_row` column).
A collection's members are shuffled each with its own seed (seed + member index).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from pertscale.checksums import file_sha256
from pertscale.config import Config, check_choice, check_range
from pertscale.store.collection import write_collection
from pertscale.store.format import (
    CODECS,
    COLLECTION_NAME,
    DEFAULT_CHUNK_VALUES,
    DEFAULT_CODEC,
    DEFAULT_COMPRESSION_LEVEL,
    DEFAULT_SHARD_VALUES,
    FORMAT_NAME,
    SOURCE_ROW,
    group_meta,
    open_kvstore,
    read_json,
    write_json,
)
from pertscale.store.shuffle import DEFAULT_BUCKET_VALUES, write_shuffled
from pertscale.store.writer import StoreWriter, begin_replacement, prepare_output, swap_in

__all__ = ["ORDERS", "VALUE_KINDS", "IngestConfig", "file_sha256", "ingest", "ingest_h5ad"]

VALUE_KINDS = ("raw_counts", "normalised")
ORDERS = ("shuffled", "source")
DENSE_BLOCK_VALUES = 2**25  # values of a dense X block read at once (128 MiB of float32)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class IngestConfig(Config):
    """How .h5ad files become a store."""

    values: str = "raw_counts"  # what the matrix holds: raw_counts (validated) or normalised
    counts_from: str = "X"  # matrix to store: X, raw (.raw.X) or layer:NAME
    obs_columns: list[str] | None = None  # obs columns to carry over (None = all)
    gene_id_column: str = ""  # var column of gene ids, e.g. Ensembl ("" = the var index)
    gene_symbol_column: str = ""  # var column of gene symbols ("" = gene_symbol or the index)
    block_rows: int = 16384  # cells read from the file per block
    chunk_values: int = DEFAULT_CHUNK_VALUES  # values per inner zarr chunk
    shard_values: int = DEFAULT_SHARD_VALUES  # values per shard file of X/indices and X/data
    compression_level: int = DEFAULT_COMPRESSION_LEVEL  # zstd level (1-22)
    codec: str = DEFAULT_CODEC  # blosc codec of X: zstd (smaller) or lz4 (faster reads)
    order: str = "shuffled"  # cell order of the store: shuffled (seeded) or source (the file's)
    seed: int = 0  # seed of the shuffled order (a collection's member i uses seed + i)
    shuffle_bucket_values: int = DEFAULT_BUCKET_VALUES  # values per shuffle bucket (memory)
    overwrite: bool = False  # replace a complete store of other data at the output path

    def __post_init__(self) -> None:
        check_choice("values", self.values, VALUE_KINDS)
        if not (self.counts_from in ("X", "raw") or
                (self.counts_from.startswith("layer:") and len(self.counts_from) > 6)):
            raise ValueError(f"counts_from={self.counts_from!r} is not one of 'X', 'raw', "
                             "'layer:NAME'")
        check_range("block_rows", self.block_rows, 1)
        check_range("chunk_values", self.chunk_values, 1)
        check_range("shard_values", self.shard_values, self.chunk_values)
        check_range("compression_level", self.compression_level, 1, 22)
        check_choice("codec", self.codec, CODECS)
        check_choice("order", self.order, ORDERS)
        check_range("seed", self.seed, 0)
        check_range("shuffle_bucket_values", self.shuffle_bucket_values, 1)




def _open_matrix(f: h5py.File, path: Path, counts_from: str) -> tuple[Any, pd.DataFrame]:
    """(row-sliceable matrix, var) for the configured source matrix of an open .h5ad."""
    import anndata.io

    if counts_from == "X":
        key, var_key = "X", "var"
    elif counts_from == "raw":
        key, var_key = "raw/X", "raw/var"
    else:
        name = counts_from.split(":", 1)[1]
        key, var_key = f"layers/{name}", "var"
        if name not in f.get("layers", {}):
            layers = sorted(f["layers"]) if "layers" in f else []
            raise ValueError(f"{path}: layer {name!r} not found; layers: {layers}")
    if key not in f:
        raise ValueError(f"{path}: has no {key} matrix (counts_from={counts_from!r})")
    elem = f[key]
    encoding = elem.attrs.get("encoding-type", "array")
    if isinstance(encoding, bytes):
        encoding = encoding.decode()
    if encoding in ("csr_matrix", "csc_matrix"):
        # NOTE: indptr read per block (anndata caches the whole of it by default: 8 B a cell)
        matrix = anndata.io.sparse_dataset(elem, should_cache_indptr=False)
    elif isinstance(elem, h5py.Dataset) and elem.ndim == 2:
        matrix = elem
    else:
        raise ValueError(f"{path}: {key} has unsupported encoding {encoding!r}")
    var = anndata.io.read_elem(f[var_key])
    if matrix.shape[1] != len(var):
        raise ValueError(f"{path}: {key} has {matrix.shape[1]} columns but {var_key} has "
                         f"{len(var)} genes")
    return matrix, var


class ObsBlocks:
    """The .h5ad obs table read row block by row block: only the selected columns, each
    sliced on disk (arrays, strings, categoricals with their categories read once, nullable
    integers/booleans); a column of another encoding is read whole once (anndata's read_elem).
    Memory: one block of the selected columns, whatever the file's cell count."""

    def __init__(self, group: h5py.Group, columns: list[str] | None, path: Path) -> None:
        import anndata.io

        order = [str(c) for c in group.attrs.get("column-order", [])]
        if columns is None:
            columns = order
        missing = [c for c in columns if c not in order]
        if missing:
            raise ValueError(f"{path}: obs column(s) {missing} not found; available: {order}")
        self.columns = list(columns)
        self._index = group[str(group.attrs["_index"])]
        self.n_rows = int(self._index.shape[0])
        self._read: dict[str, Callable[[int, int], Any]] = {}
        for name in self.columns:
            elem = group[name]
            enc = elem.attrs.get("encoding-type", "array")
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
            if enc in ("array", "string-array") and isinstance(elem, h5py.Dataset):
                self._read[name] = functools.partial(_slice_dataset, elem)
            elif enc == "categorical":
                cats = anndata.io.read_elem(elem["categories"])
                self._read[name] = functools.partial(
                    _slice_categorical, elem["codes"], pd.Index(cats),
                    bool(elem.attrs.get("ordered", False)))
            elif enc in ("nullable-integer", "nullable-boolean"):
                dtype = "Int64" if enc == "nullable-integer" else "boolean"
                self._read[name] = functools.partial(_slice_nullable, elem, dtype)
            else:
                whole = pd.Series(anndata.io.read_elem(elem))
                self._read[name] = lambda a, b, whole=whole: whole.iloc[a:b].to_numpy()

    def block(self, start: int, stop: int) -> pd.DataFrame:
        index = pd.Index(_slice_dataset(self._index, start, stop), dtype=object)
        return pd.DataFrame({name: self._read[name](start, stop) for name in self.columns},
                            index=index)


def _slice_dataset(ds: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    values = ds[start:stop]
    if values.dtype.kind in ("O", "S"):
        return np.array([v.decode() if isinstance(v, bytes) else v for v in values], object)
    return values


def _slice_categorical(codes: h5py.Dataset, categories: pd.Index, ordered: bool,
                       start: int, stop: int) -> pd.Categorical:
    return pd.Categorical.from_codes(codes[start:stop].astype(np.int64), categories,
                                     ordered=ordered)


def _slice_nullable(group: h5py.Group, dtype: str, start: int, stop: int) -> pd.api.extensions.ExtensionArray:
    values = pd.array(group["values"][start:stop], dtype=dtype)
    if "mask" in group:
        values[group["mask"][start:stop].astype(bool)] = pd.NA
    return values


def _source(path: Path, cfg: IngestConfig) -> dict[str, Any]:
    source = {"file": path.name, "path": str(path.resolve()), "sha256": file_sha256(path),
              "bytes": path.stat().st_size, "counts_from": cfg.counts_from, "values": cfg.values,
              "obs_columns": cfg.obs_columns, "order": cfg.order}
    if cfg.order == "shuffled":
        source.update(seed=cfg.seed, source_row_column=SOURCE_ROW)
    return source


def _same_source(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("sha256", "counts_from", "values", "obs_columns", "order", "seed")
    return all(a.get(k) == b.get(k) for k in keys)


def _existing_attrs(out: str) -> dict[str, Any]:
    path = Path(out)
    if not (path / "zarr.json").is_file():
        return {}
    return (read_json(open_kvstore(out), "zarr.json") or {}).get("attributes", {})


def ingest_h5ad(path: str | Path, out: str | Path, cfg: IngestConfig | None = None,
                *, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Ingest one .h5ad into a store at `out`; returns the store's root attributes."""
    cfg = cfg or IngestConfig()
    path, out = Path(path), str(out)
    _check_input(path)
    if path.stat().st_size == 0:
        raise ValueError(f"input file {path} is empty")
    source = _source(path, cfg)
    existing = _existing_attrs(out)
    if existing.get("pertscale_format") == FORMAT_NAME and existing.get("complete") \
            and _same_source(existing.get("source", {}), source) and not cfg.overwrite:
        return existing  # already ingested: same file, same settings
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable .h5ad file (truncated or not HDF5?): {e}") \
            from None
    with f:
        try:
            matrix, var = _open_matrix(f, path, cfg.counts_from)
            obs = ObsBlocks(f["obs"], cfg.obs_columns, path) if "obs" in f else None
        except (KeyError, OSError) as e:
            raise ValueError(f"{path}: cannot read as .h5ad (truncated file?): {e}") from None
        n_cells = matrix.shape[0]
        if n_cells == 0:
            raise ValueError(f"{path} has no cells")
        if obs is None or obs.n_rows != n_cells:
            raise ValueError(f"{path}: obs has {0 if obs is None else obs.n_rows} rows for "
                             f"{n_cells} cells")
        var = _gene_table(var, cfg, path)
        rows = cfg.block_rows
        if isinstance(matrix, h5py.Dataset):  # dense X: blocks sized by values, not rows
            rows = max(1, min(rows, DENSE_BLOCK_VALUES // max(1, matrix.shape[1])))
            if rows < cfg.block_rows:
                log.info("%s: dense X of %d genes is read %d rows at a time (block_rows=%d "
                         "would be %d values)", path, matrix.shape[1], rows, cfg.block_rows,
                         cfg.block_rows * matrix.shape[1])
        if cfg.order == "shuffled" and SOURCE_ROW in obs.columns:
            raise ValueError(f"{path}: obs already has a column {SOURCE_ROW!r}, where a shuffled "
                             f"ingest keeps each cell's source row; leave it out with "
                             f"--obs-columns, or keep the file's order with --order source")
        blocks = _source_blocks(path, matrix, obs, rows)
        with StoreWriter(out, var=var, raw_counts=cfg.values == "raw_counts", source=source,
                         overwrite=cfg.overwrite, chunk_values=cfg.chunk_values,
                         shard_values=cfg.shard_values,
                         compression_level=cfg.compression_level, codec=cfg.codec) as writer:
            if cfg.order == "source":
                for start, block, obs_block in blocks:
                    writer.append(block, obs_block)
                    if progress is not None:
                        progress(start + block.shape[0], n_cells)
            else:
                log.info("%s: cells written in a seeded random order (seed %d; --order source "
                         "keeps the file's order)", out, cfg.seed)
                write_shuffled(writer, blocks, n_cells=n_cells, values=_num_values(matrix),
                               seed=cfg.seed, block_rows=cfg.block_rows,
                               bucket_values=cfg.shuffle_bucket_values, progress=progress)
    return _existing_attrs(out)


def _check_input(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"input {path} is a directory, not an .h5ad file")
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")


def _source_blocks(path: Path, matrix: Any, obs: ObsBlocks, rows: int):
    """(first row, matrix block, obs block) of the file in its order, `rows` cells at a time."""
    n_cells = matrix.shape[0]
    for start in range(0, n_cells, rows):
        stop = min(start + rows, n_cells)
        try:
            block = matrix[start:stop]
        except OSError as e:
            raise ValueError(f"{path}: cannot read rows {start}-{stop} (truncated file?): {e}") \
                from None
        yield start, block, obs.block(start, stop)


def _num_values(matrix: Any) -> int:
    """Stored values of a sparse matrix (from its indptr), cells x genes for a dense one."""
    if isinstance(matrix, h5py.Dataset):
        return int(matrix.shape[0]) * int(matrix.shape[1])
    return int(matrix.group["indptr"][-1])


def _gene_table(var: pd.DataFrame, cfg: IngestConfig, path: Path) -> pd.DataFrame:
    """var with gene ids as index (the index, or cfg.gene_id_column) and a gene_symbol column
    (cfg.gene_symbol_column, an existing gene_symbol column, or the original index)."""
    var = var.copy()
    for field in ("gene_id_column", "gene_symbol_column"):
        col = getattr(cfg, field)
        if col and col not in var.columns:
            raise ValueError(f"{path}: var column {col!r} ({field}) not found; available: "
                             f"{list(var.columns)}")
    original = var.index.astype(str)
    if cfg.gene_symbol_column and cfg.gene_symbol_column != "gene_symbol":
        var = var.drop(columns=["gene_symbol"], errors="ignore")
        var = var.rename(columns={cfg.gene_symbol_column: "gene_symbol"})
    elif "gene_symbol" not in var.columns:
        var.insert(0, "gene_symbol", original)
    if cfg.gene_id_column:
        ids = var.pop(cfg.gene_id_column) if cfg.gene_id_column != "gene_symbol" \
            else var["gene_symbol"]
        if ids.isna().any():
            missing = list(original[ids.isna().to_numpy()][:5])
            raise ValueError(f"{path}: var column {cfg.gene_id_column!r} has no gene id for "
                             f"genes {missing}")
        var.index = pd.Index(ids.astype(str).to_numpy(), name=None)
    if var.index.has_duplicates:
        dup = sorted(set(var.index[var.index.duplicated()].astype(str)))
        raise ValueError(f"{path}: duplicate gene ids in var: {dup[:10]} ({len(dup)} genes)")
    return var


def ingest(inputs: list[str | Path], out: str | Path, cfg: IngestConfig | None = None,
           *, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Ingest one file into a store, or several into a collection at `out`."""
    cfg = cfg or IngestConfig()
    inputs = [Path(p) for p in inputs]
    out = str(out)
    if not inputs:
        raise ValueError("ingest needs at least one input .h5ad file")
    seen: dict[Path, Path] = {}
    for p in inputs:
        key = Path(p).resolve()
        if key in seen:
            raise ValueError(f"input file {p} is given twice (as {seen[key]} too); each file "
                             f"once, or every cell would be stored twice")
        seen[key] = Path(p)
    for p in inputs:
        _check_input(p)
    report = (lambda name: (lambda done, total: progress(name, done, total))) if progress \
        else (lambda name: None)
    if len(inputs) == 1:
        return ingest_h5ad(inputs[0], out, cfg, progress=report(inputs[0].name))
    names = [f"members/{i:03d}-{p.stem}" for i, p in enumerate(inputs)]
    existing = _existing_attrs(out)
    if existing.get("pertscale_format") == COLLECTION_NAME and existing.get("complete"):
        same = [m["path"] for m in existing["members"]] == names and all(
            _same_source(m.get("source", {}), _source(p, _member_cfg(cfg, i)))
            for i, (m, p) in enumerate(zip(existing["members"], inputs)))
        if same and not cfg.overwrite:
            return existing
    replacing = False
    if existing.get("pertscale_format") != COLLECTION_NAME or existing.get("complete"):
        replacing = prepare_output(out, overwrite=cfg.overwrite)  # resume only an incomplete one
    # NOTE: a complete store is replaced only once its replacement is committed (writer.py)
    target = str(begin_replacement(Path(out))) if replacing else out
    try:
        attrs = _write_members(inputs, names, target, cfg, report)
    except BaseException:
        if replacing:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if replacing:
        swap_in(Path(target), Path(out))
    return attrs


def _write_members(inputs: list[Path], names: list[str], out: str, cfg: IngestConfig,
                   report: Callable) -> dict[str, Any]:
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(open_kvstore(out), "zarr.json", group_meta(
        {"pertscale_format": COLLECTION_NAME, "complete": False,
         "inputs": [str(p) for p in inputs]}))
    for i, (p, name) in enumerate(zip(inputs, names)):
        member = f"{out.rstrip('/')}/{name}"
        member_cfg = _member_cfg(cfg, i)
        done = _existing_attrs(member)
        if done.get("complete") and _same_source(done.get("source", {}), _source(p, member_cfg)):
            continue  # finished before an interruption: resume after it
        ingest_h5ad(p, member, member_cfg, progress=report(p.name))
    return write_collection(out, names)


def _member_cfg(cfg: IngestConfig, i: int) -> IngestConfig:
    """Member i's settings: overwritten freely (members belong to the collection), and its own
    shuffle seed so that members of equal files are not shuffled alike."""
    return cfg.replace(overwrite=True, seed=cfg.seed + i)
