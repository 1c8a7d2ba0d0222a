"""Append-only 1-D zarr arrays and DataFrame column sinks, written in whole shards.

A sharded zarr array is cheapest to write one whole shard at a time: every shard file is written
exactly once (no read-modify-write), its sha256 is taken right after the write and goes into the
store's manifest. `AppendArray` buffers appended values until a shard is full; memory stays
bounded by one shard (plus the one being written) per array.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd
import tensorstore as ts

from pertscale.store.format import DEFAULT_COMPRESSION_LEVEL, array_spec, shard_key

__all__ = ["AppendArray", "ColumnSink"]


class AppendArray:
    """A 1-D zarr v3 array under a store root that grows by `append`; shards written whole."""

    def __init__(self, kv: ts.KvStore, kv_spec: dict[str, Any], path: str, dtype: Any, *,
                 shard_values: int, chunk_values: int,
                 compression_level: int = DEFAULT_COMPRESSION_LEVEL, codec: str = "zstd"):
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
                          compression_level=compression_level, codec=codec)
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


def _json_value(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


class ColumnSink:
    """One DataFrame column appended block by block (see the encodings in format.py).

    The encoding is fixed by the first block: numbers and bools stay numeric; categoricals keep
    their categories (new ones seen later are appended); strings become categorical, or stay
    strings when `strings="string"` (cell ids, gene symbols)."""

    def __init__(self, kv: ts.KvStore, kv_spec: dict[str, Any], path: str, first: pd.Series, *,
                 strings: str, shard_values: int, chunk_values: int,
                 compression_level: int = DEFAULT_COMPRESSION_LEVEL, codec: str = "zstd"):
        self.path = path
        make = lambda sub, dtype: AppendArray(
            kv, kv_spec, sub, dtype, shard_values=shard_values, chunk_values=chunk_values,
            compression_level=compression_level)
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
            self.values = make(path, self.dtype)
        elif self.kind == "categorical":
            self.values = make(path, np.int32)
        else:
            self.bytes = make(f"{path}/bytes", np.uint8)
            self.offsets = make(f"{path}/offsets", np.int64)
            self.offsets.append(np.zeros(1, np.int64))
            self._nbytes = 0

    def append(self, col: pd.Series) -> None:
        if self.kind == "numeric":
            if not (pd.api.types.is_bool_dtype(col.dtype) or pd.api.types.is_numeric_dtype(col.dtype)):
                raise ValueError(f"column {self.path!r} changed from numeric to {col.dtype}")
            self.values.append(col.to_numpy(dtype=self.dtype, na_value=np.nan)
                               if self.dtype.kind == "f" else col.to_numpy(dtype=self.dtype))
        elif self.kind == "categorical":
            self.values.append(self._codes(col))
        else:
            values = col.to_numpy(dtype=object)
            texts = pd.Series(values).where(~pd.isna(values), "").astype(str).tolist()
            joined = "".join(texts)
            blob = joined.encode("utf-8")
            if len(blob) == len(joined):  # ASCII: characters are bytes
                lengths = np.fromiter(map(len, texts), np.int64, len(texts))
            else:
                lengths = np.fromiter((len(t.encode("utf-8")) for t in texts), np.int64,
                                      len(texts))
            self.bytes.append(np.frombuffer(blob, np.uint8))
            self.offsets.append(self._nbytes + np.cumsum(lengths))
            self._nbytes += int(lengths.sum())

    def _codes(self, col: pd.Series) -> np.ndarray:
        cat = col.astype("category") if not isinstance(col.dtype, pd.CategoricalDtype) else col
        cats = cat.cat.categories
        for c in cats:  # keep the source order of categories; append unseen ones
            self.categories.setdefault(_json_value(c), len(self.categories))
        lut = np.array([self.categories[_json_value(c)] for c in cats] + [-1], dtype=np.int32)
        codes = cat.cat.codes.to_numpy()
        return lut[np.where(codes < 0, len(cats), codes)]

    def close(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Finish the column; returns (encoding attributes, shard manifest entries)."""
        if self.kind == "numeric":
            self.values.close()
            return {"encoding": "numeric", "dtype": self.dtype.name}, self.values.manifest
        if self.kind == "categorical":
            self.values.close()
            return ({"encoding": "categorical", "categories": list(self.categories),
                     "ordered": self.ordered}, self.values.manifest)
        self.bytes.close()
        self.offsets.close()
        return {"encoding": "string"}, self.bytes.manifest + self.offsets.manifest
