"""`pertscale migrate STORE`: rewrite a format-v1 store (or every member of a v1 collection)
as format v2, in place and atomically, without recompressing X.

The v2 store is written beside the old one (`.<name>.pertscale-new`, as `ingest --overwrite`
does) and swapped in only once committed; an error or an interrupt before then leaves the v1
store as it was. X's shard files are hard links to the old ones (same bytes, same sha256, no
decode); the tables (obs in row blocks, var, statistics) are rewritten in AnnData's encodings.
The fingerprint changes (it hashes the new metadata documents); the old one is kept in
`source.migrated_from`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pertscale.store.collection import write_collection
from pertscale.store.format import (
    COLLECTION_NAME,
    N_COUNTS,
    X_DATA,
    X_INDICES,
    X_INDPTR,
    StoreError,
    decode_column,
    decode_strings,
    join_uri,
    local_path,
    read_json,
    write_json,
)
from pertscale.store.reader import CellStore, open_store, read_store_attrs
from pertscale.store.writer import StoreWriter

__all__ = ["OBS_BLOCK_ROWS", "migrate"]

OBS_BLOCK_ROWS = 1 << 20  # obs rows read and rewritten at a time (bounded memory)
# root attributes the writer sets itself; any other v1 attribute is carried over
_WRITER_KEYS = {"pertscale_format", "format_version", "complete", "source", "n_cells",
                "n_genes", "nnz", "raw_counts", "value_dtype", "stats", "tool", "manifest",
                "metadata", "fingerprint", "encoding-type", "encoding-version"}


def migrate(uri: str | Path) -> list[str]:
    """Rewrite the v1 store or collection at `uri` as format v2; returns one line per store
    (migrated, or already v2)."""
    uri = str(uri)
    if local_path(uri) is None:
        raise StoreError(f"{uri}: migrate rewrites local stores; download the store, migrate "
                         "it and upload the result")
    attrs = read_store_attrs(uri)
    if attrs["pertscale_format"] != COLLECTION_NAME:
        return [_migrate_store(uri)]
    paths = [m["path"] for m in attrs["members"]]
    done = [_migrate_store(join_uri(uri, p)) for p in paths]
    write_collection(uri, paths)  # the members' new fingerprints
    return done


def _migrate_store(uri: str) -> str:
    old = open_store(uri)
    if old.format_version >= 2:
        return f"{uri}: already format v{old.format_version}"
    _Migration(old).run()
    return f"{uri}: format v1 -> v2 (X linked, not recompressed; tables rewritten)"


class _Migration(StoreWriter):
    """A StoreWriter whose X is the old store's shard files (hard links), not appended."""

    def __init__(self, old: CellStore):
        self._old = old
        meta = read_json(old._kv, f"{X_DATA}/zarr.json")
        shard = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        chunk = int(meta["codecs"][0]["configuration"]["chunk_shape"][0])
        source = dict(old.attrs.get("source", {}))
        source["migrated_from"] = {"format_version": old.format_version,
                                   "fingerprint": old.attrs["fingerprint"],
                                   "tool": old.attrs.get("tool")}
        extra = {k: v for k, v in old.attrs.items() if k not in _WRITER_KEYS}
        super().__init__(old.uri, var=old.var, raw_counts=old.raw_counts, source=source,
                         overwrite=True, chunk_values=chunk, shard_values=shard,
                         extra_attrs=extra)

    def _open_x(self, shard_values: int, codec: str) -> None:
        old_root = Path(local_path(self._old.uri))
        manifest = self._old.attrs["manifest"]
        for array in (X_INDPTR, X_INDICES, X_DATA):
            doc = read_json(self._old._kv, f"{array}/zarr.json")
            write_json(self._kv, f"{array}/zarr.json", doc)
            for entry in manifest[array]:
                target = self._path / entry["key"]
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(old_root / entry["key"], target)
        self._x_manifest = {a: manifest[a] for a in (X_INDPTR, X_INDICES, X_DATA)}

    def _close_x(self) -> dict[str, list[dict[str, Any]]]:
        return self._x_manifest

    def run(self) -> None:
        try:
            old = self._old
            columns = old.obs_column_names
            for start in range(0, old.n_cells, OBS_BLOCK_ROWS):
                stop = min(start + OBS_BLOCK_ROWS, old.n_cells)
                self._append_obs(_v1_obs_rows(old, columns, start, stop))
            self._stats = old.read_stats()
            self.nnz = old.nnz
            self.integers_only = False  # values are not new: nothing to say about them
        except BaseException:
            self._discard()
            raise
        self.__exit__(None, None, None)


def _v1_obs_rows(store: CellStore, columns: list[str], start: int, stop: int) -> pd.DataFrame:
    """obs rows [start, stop) of a v1 store, column by column (v1 encodings)."""
    encodings = store._table_attrs("obs")["encodings"]

    def rows(name: str) -> Any:
        enc = encodings[name]
        read = lambda path, a, b: store._read(store._open(f"obs/{path}")[a:b], f"obs/{path}")
        if enc["encoding"] == "string":
            offsets = read(f"{name}/offsets", start, stop + 1).astype(np.int64)
            data = read(f"{name}/bytes", int(offsets[0]), int(offsets[-1]))
            return decode_strings(offsets - offsets[0], data)
        return decode_column(enc, lambda path: read(path, start, stop), name)

    ids = pd.Index(rows("_index"), dtype=object)
    obs = pd.DataFrame({name: rows(name) for name in columns}, index=ids)
    if N_COUNTS not in obs.columns:
        raise StoreError(f"store {store.uri}: obs has no {N_COUNTS} column")
    return obs
