"""Append-only 1-D zarr arrays and DataFrame column sinks, written in whole shards.

A sharded zarr array is cheapest to write one whole shard at a time: every shard file is written
exactly once (no read-modify-write), its sha256 is taken right after the write and goes into the
store's manifest. `AppendArray` buffers appended values until a shard is full; memory stays
bounded by one shard (plus the one being written) per array. `StringArray` does the same for
AnnData's string arrays, one chunk file at a time.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd
import tensorstore as ts

from pertscale.store.format import (
    DEFAULT_COMPRESSION_LEVEL,
    anndata_encoding,
    array_spec,
    encode_string_chunk,
    group_meta,
    shard_key,
    string_array_meta,
    write_json,
)

__all__ = ["AppendArray", "ColumnSink", "StringArray"]


class AppendArray:
    """A 1-D zarr v3 array under a store root that grows by `append`; shards written whole."""

    def __init__(self, kv: ts.KvStore, kv_spec: dict[str, Any], path: str, dtype: Any, *,
                 shard_values: int, chunk_values: int,
                 compression_level: int = DEFAULT_COMPRESSION_LEVEL, codec: str = "zstd",
                 attributes: dict[str, Any] | None = None):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.shard_values = shard_values
        self._kv = kv
        chunk_values = min(chunk_values, shard_values)
        if shard_values % chunk_values:
            raise ValueError(f"shard_values={shard_values} must be a multiple of "
                             f"chunk_values={chunk_values}")
        spec = array_spec(kv_spec, path, self.dtype, shard_values=shard_values,
                          chunk_values=chunk_values, create=True,
                          compression_level=compression_level, codec=codec,
                          attributes=attributes)
        self._arr = ts.open(spec).result()
        self._buf = np.empty(shard_values, self.dtype)  # the shard being filled
        self._fill = 0
        self._spare: np.ndarray | None = None  # a written shard's buffer, free for reuse
        self._written = 0  # values already handed to tensorstore
        self._pending: tuple[Any, int, np.ndarray] | None = None
        self.manifest: list[dict[str, Any]] = []

    @property
    def length(self) -> int:
        return self._written + self._fill

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values).reshape(-1)
        pos = 0
        while pos < values.size:
            take = min(values.size - pos, self.shard_values - self._fill)
            self._buf[self._fill:self._fill + take] = values[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == self.shard_values:
                self._write_shard()

    def _write_shard(self) -> None:
        """Hand the filled part of the buffer to tensorstore as one shard (the last shard may
        be partial); the write runs while the next shard fills."""
        if self._fill == 0:
            return
        self._wait()
        start, n = self._written, self._fill
        self._arr = self._arr.resize(exclusive_max=[start + n], expand_only=True).result()
        out = self._buf[:n]
        # NOTE: `out` stays referenced until the write completes; a fresh buffer fills meanwhile.
        self._pending = (self._arr[start:start + n].write(out), start // self.shard_values, out)
        self._written += n
        if n == self.shard_values:  # reuse the buffer of the finished write (no page faults)
            self._buf = self._spare if self._spare is not None \
                else np.empty(self.shard_values, self.dtype)
            self._spare = None
        self._fill = 0

    def _wait(self) -> None:
        if self._pending is None:
            return
        future, shard, done = self._pending
        future.result()
        self._pending = None
        if done.size == self.shard_values:
            self._spare = done
        key = shard_key(self.path, shard)
        res = self._kv.read(key).result()
        if res.state != "value":
            raise OSError(f"shard {key} was not written")
        blob = bytes(res.value)
        self.manifest.append({"key": key, "size": len(blob),
                              "sha256": hashlib.sha256(blob).hexdigest()})

    def close(self) -> int:
        """Write the remaining values (the last, partial shard) and return the final length."""
        self._write_shard()
        self._wait()
        self._buf = self._spare = None
        return self._written


class StringArray:
    """A 1-D AnnData string array (zarr `string`, vlen-utf8) that grows by `append`; each chunk
    file is written once, when full, and hashed into the manifest."""

    def __init__(self, kv: ts.KvStore, path: str, *, chunk: int,
                 compression_level: int = DEFAULT_COMPRESSION_LEVEL):
        self.path = path
        self._kv = kv
        self._chunk = chunk
        self._level = compression_level
        self._buf: list[np.ndarray] = []
        self._fill = 0
        self._chunks = 0
        self.length = 0
        self.manifest: list[dict[str, Any]] = []

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=object).reshape(-1)
        pos = 0
        while pos < values.size:
            take = min(values.size - pos, self._chunk - self._fill)
            self._buf.append(values[pos:pos + take])
            self._fill += take
            pos += take
            if self._fill == self._chunk:
                self._write_chunk()
        self.length += values.size

    def _write_chunk(self) -> None:
        if not self._fill:
            return
        key = shard_key(self.path, self._chunks)
        blob = encode_string_chunk(np.concatenate(self._buf), self._chunk, self._level)
        self._kv.write(key, blob).result()
        self.manifest.append({"key": key, "size": len(blob),
                              "sha256": hashlib.sha256(blob).hexdigest()})
        self._chunks += 1
        self._buf, self._fill = [], 0

    def close(self) -> int:
        """Write the last chunk and the array's zarr.json; returns the length."""
        if self._chunks == 0:  # all of it fits one chunk: exactly its size, no padding
            self._chunk = max(1, self.length)
        self._write_chunk()
        write_json(self._kv, f"{self.path}/zarr.json",
                   string_array_meta(self.length, self._chunk, self._level))
        return self.length


def _json_value(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _texts(col: pd.Series) -> np.ndarray:
    """A column's values as str (missing -> "")."""
    values = col.to_numpy(dtype=object)
    return pd.Series(values).where(~pd.isna(values), "").astype(str).to_numpy(object)


class ColumnSink:
    """One DataFrame column appended block by block, in AnnData's encodings (format v2):

    - numbers and bools: an `array` of their dtype (nullable ints and floats as float64, NaN =
      missing);
    - categoricals: a `categorical` group of int32 `codes` (-1 = missing) and `categories`,
      which keep their source order (new ones seen later are appended);
    - strings: categorical, or a `string-array` when `strings="string"` (cell ids, gene
      symbols)."""

    def __init__(self, kv: ts.KvStore, kv_spec: dict[str, Any], path: str, first: pd.Series, *,
                 strings: str, shard_values: int, chunk_values: int,
                 compression_level: int = DEFAULT_COMPRESSION_LEVEL):
        self.path = path
        self._kv = kv
        self._level = compression_level
        self._table_chunk = chunk_values
        self._make = lambda sub, dtype: AppendArray(
            kv, kv_spec, sub, dtype, shard_values=shard_values, chunk_values=chunk_values,
            compression_level=compression_level, attributes=anndata_encoding("array"))
        dtype = first.dtype
        self.categories: dict[Any, int] = {}
        self.ordered = False
        if isinstance(dtype, pd.CategoricalDtype):
            self.kind = "categorical"
            self.ordered = bool(dtype.ordered)
        elif pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype):
            self.kind = "numeric"
            self.dtype = np.dtype("float64") if isinstance(dtype, pd.api.extensions.ExtensionDtype) \
                else np.dtype(dtype)
        elif pd.api.types.is_string_dtype(dtype) or dtype == object:
            self.kind = strings
        else:
            raise ValueError(f"column {path!r} has unsupported dtype {dtype}")
        if self.kind == "numeric":
            self.values = self._make(path, self.dtype)
        elif self.kind == "categorical":
            self.values = self._make(f"{path}/codes", np.int32)
        else:
            self.strings = StringArray(kv, path, chunk=chunk_values,
                                       compression_level=compression_level)

    def append(self, col: pd.Series) -> None:
        if self.kind == "numeric":
            if not (pd.api.types.is_bool_dtype(col.dtype) or pd.api.types.is_numeric_dtype(col.dtype)):
                raise ValueError(f"column {self.path!r} changed from numeric to {col.dtype}")
            self.values.append(col.to_numpy(dtype=self.dtype, na_value=np.nan)
                               if self.dtype.kind == "f" else col.to_numpy(dtype=self.dtype))
        elif self.kind == "categorical":
            self.values.append(self._codes(col))
        else:
            self.strings.append(_texts(col))

    def _codes(self, col: pd.Series) -> np.ndarray:
        cat = col.astype("category") if not isinstance(col.dtype, pd.CategoricalDtype) else col
        cats = cat.cat.categories
        for c in cats:  # keep the source order of categories; append unseen ones
            self.categories.setdefault(_json_value(c), len(self.categories))
        lut = np.array([self.categories[_json_value(c)] for c in cats] + [-1], dtype=np.int32)
        codes = cat.cat.codes.to_numpy()
        return lut[np.where(codes < 0, len(cats), codes)]

    def close(self) -> dict[str, list[dict[str, Any]]]:
        """Finish the column (its arrays and, for a categorical, its group and categories);
        returns the shard manifest entries of its files, per array."""
        if self.kind == "numeric":
            self.values.close()
            return {self.path: self.values.manifest}
        if self.kind == "string":
            self.strings.close()
            return {self.path: self.strings.manifest}
        self.values.close()
        cats = pd.Index(list(self.categories))
        if cats.inferred_type in ("string", "empty"):
            arr: Any = StringArray(self._kv, f"{self.path}/categories", chunk=self._table_chunk,
                                   compression_level=self._level)
            arr.append(cats.to_numpy(object))
        else:
            arr = self._make(f"{self.path}/categories", cats.to_numpy().dtype)
            arr.append(cats.to_numpy())
        arr.close()
        write_json(self._kv, f"{self.path}/zarr.json", group_meta(
            {**anndata_encoding("categorical"), "ordered": self.ordered}))
        return {self.values.path: self.values.manifest, arr.path: arr.manifest}
