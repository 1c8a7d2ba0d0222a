"""Cell store format (v2, reading v1 too): names, codecs, URIs and column encodings shared by
writer and reader.

The on-disk layout is specified in storage/README.md. Everything that both the writer and the
reader must agree on lives here: attribute keys, array paths, the zarr v3 codec chain (sharding
with crc32c on the shard index and on every inner chunk), the tensorstore kvstore spec built from
a URI (local path, s3://, gs://), the AnnData encodings of format v2 (a v2 store is an AnnData
zarr store) and the v1 encodings of DataFrame columns, still read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import tensorstore as ts

__all__ = [
    "COLLECTION_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "StoreError",
    "StoreUnreachable",
    "array_spec",
    "decode_column",
    "decode_strings",
    "group_meta",
    "join_uri",
    "kvstore_spec",
    "local_path",
    "open_kvstore",
    "read_json",
    "shard_key",
    "write_json",
]

FORMAT_NAME = "pertscale.cellstore"
COLLECTION_NAME = "pertscale.collection"
FORMAT_VERSION = 2  # v2: also an AnnData zarr store; v1 stores stay readable

# Array paths inside a store.
X_INDPTR, X_INDICES, X_DATA = "X/indptr", "X/indices", "X/data"
STATS_DIR = "uns/pertscale_stats"  # v1: "stats" (a root group AnnData does not know)
STATS_DIR_V1 = "stats"
STATS_FIELDS = ("sum", "sum_sq", "nnz", "seurat_sum", "seurat_sum_sq")
INDEX_COLUMN = "_index"  # the DataFrame index (cell ids / gene ids), stored as a string column
N_COUNTS = "n_counts"  # per-cell sum of stored values, added to obs by the writer
SOURCE_ROW = "source_row"  # a shuffled ingest's obs column: each cell's row in its source file

# Default sizes, in values per inner chunk / per shard file.
DEFAULT_CHUNK_VALUES = 128 * 1024
DEFAULT_SHARD_VALUES = 16 * 1024 * 1024
TABLE_SHARD_VALUES = 1024 * 1024  # obs/var columns and indptr: small arrays, smaller shards
# NOTE: zstd level 1 keeps ~99% of level 3's ratio on count data at 2-3x the write speed
# (measured on simulated counts); decompression speed does not depend on the level.
DEFAULT_COMPRESSION_LEVEL = 1
# blosc codec of X/indices and X/data. zstd (default) is ~35% smaller, for object storage;
# lz4 decodes ~2x faster (measured: loader 84k vs 24k cells/s on 100k x 20k simulated cells),
# for local training copies. Tables always use zstd.
CODECS = ("zstd", "lz4")
DEFAULT_CODEC = "zstd"


# AnnData's on-disk encodings (the AnnData on-disk specification, as anndata 0.12 writes zarr v3).
def anndata_encoding(kind: str) -> dict[str, str]:
    """The `encoding-type`/`encoding-version` attributes of an AnnData element of `kind`."""
    version = {"anndata": "0.1.0", "dict": "0.1.0", "csr_matrix": "0.1.0"}.get(kind, "0.2.0")
    return {"encoding-type": kind, "encoding-version": version}


class StoreError(ValueError):
    """A store that is missing, incomplete, corrupt or of an unknown format; names the uri."""


class StoreUnreachable(StoreError):
    """An object store's endpoint that gave no answer within the time limit (not a problem of
    the store itself)."""


def join_uri(uri: str, path: str) -> str:
    """`path` under the store or collection at `uri` (a local path or an s3:// / gs:// URI)."""
    return uri.rstrip("/") + "/" + path


def local_path(uri: str) -> Path | None:
    """The filesystem path of a local uri (plain path or file://), else None."""
    parsed = urlparse(str(uri))
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme == "file" else str(uri)).expanduser().absolute()
    if len(parsed.scheme) == 1:  # a Windows drive letter
        return Path(str(uri)).absolute()
    return None


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def kvstore_spec(uri: str) -> dict[str, Any]:
    """The tensorstore kvstore spec of a store root: the one place that turns a URI into storage.

    - local path or file://PATH -> file driver
    - s3://BUCKET/PREFIX -> s3 driver; endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL,
      region from AWS_REGION / AWS_DEFAULT_REGION, credentials from the default AWS chain
      (environment first); credentials never appear in the spec.
    - gs://BUCKET/PREFIX -> gcs driver (application default credentials).
    """
    path = local_path(uri)
    if path is not None:
        return {"driver": "file", "path": str(path) + "/"}
    parsed = urlparse(str(uri))
    prefix = parsed.path.strip("/")
    prefix = prefix + "/" if prefix else ""
    if not parsed.netloc:
        raise StoreError(f"store uri {uri!r} has no bucket")
    if parsed.scheme == "s3":
        spec: dict[str, Any] = {"driver": "s3", "bucket": parsed.netloc, "path": prefix}
        endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        region = _env("AWS_REGION", "AWS_DEFAULT_REGION")
        if endpoint:
            spec["endpoint"] = endpoint
        if region:
            spec["aws_region"] = region
        elif endpoint:
            spec["aws_region"] = "us-east-1"  # NOTE: S3-compatible servers need some region to sign
        return spec
    if parsed.scheme in ("gs", "gcs"):
        return {"driver": "gcs", "bucket": parsed.netloc, "path": prefix}
    raise StoreError(f"store uri {uri!r}: unsupported scheme {parsed.scheme!r}; "
                     "use a local path, s3://bucket/prefix or gs://bucket/prefix")


TIMEOUT_ENV = "PERTSCALE_STORE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0


def store_timeout() -> float:
    """Seconds an object-store call may take (PERTSCALE_STORE_TIMEOUT_S, default 60)."""
    from pertscale.config import env_seconds

    return env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def remote_endpoint(spec: dict[str, Any]) -> str | None:
    """Where a kvstore spec's calls go, in words (None for local files: no time limit)."""
    driver = spec.get("driver")
    if driver in ("file", "memory", None):
        return None
    where = f"{driver}://{spec.get('bucket', '')}/{spec.get('path', '')}"
    if driver == "s3":
        return f"{where} at {spec.get('endpoint', 'AWS S3')}"
    return where


def wait(future: Any, endpoint: str | None) -> Any:
    """`future.result()`; for an object store (`endpoint` not None), within store_timeout()."""
    if endpoint is None:
        return future.result()
    limit = store_timeout()
    try:
        return future.result(timeout=limit)
    except TimeoutError:
        raise StoreUnreachable(f"{endpoint}: no answer within {limit:g} s (unreachable endpoint or "
                         f"credentials? {TIMEOUT_ENV} sets the limit)") from None


def _kv_endpoint(kv: ts.KvStore) -> str | None:
    return remote_endpoint(kv.spec().to_json())


def open_kvstore(uri: str) -> ts.KvStore:
    spec = kvstore_spec(uri)
    return wait(ts.KvStore.open(spec), remote_endpoint(spec))


def read_json(kv: ts.KvStore, key: str) -> dict[str, Any] | None:
    """The JSON document at `key`, or None when the key does not exist."""
    res = wait(kv.read(key), _kv_endpoint(kv))
    if res.state != "value":
        return None
    try:
        return json.loads(bytes(res.value).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = _kv_endpoint(kv) or kv.spec().to_json().get("path", "")
        raise StoreError(f"{where}{key} is not a valid JSON document ({e}); the store's "
                         "metadata is damaged: restore or re-ingest it") from None


def write_json(kv: ts.KvStore, key: str, doc: dict[str, Any]) -> None:
    kv.write(key, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")).result()


# Root attributes that are provenance, not content: outside the fingerprint.
FINGERPRINT_EXCLUDED = ("fingerprint", "source", "tool")


def content_fingerprint(attrs: dict[str, Any]) -> str:
    """sha256 of a committed store's content: its root attributes (the shard manifest, the
    sha256 of every metadata document, sizes, value kind...) except FINGERPRINT_EXCLUDED."""
    doc = {k: v for k, v in attrs.items() if k not in FINGERPRINT_EXCLUDED}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"))
                          .encode("utf-8")).hexdigest()


def list_keys(kv: ts.KvStore) -> list[str]:
    """Every key below the store root (within the object-store time limit)."""
    return [k.decode() if isinstance(k, bytes) else str(k)
            for k in wait(kv.list(), _kv_endpoint(kv))]


def metadata_keys(kv: ts.KvStore) -> list[str]:
    """Every zarr.json document below the store root (groups and arrays), sorted."""
    return sorted(k for k in list_keys(kv) if k.endswith("zarr.json") and k != "zarr.json")


def group_meta(attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    """A zarr v3 group's zarr.json document."""
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


def shard_key(array_path: str, index: int) -> str:
    """The key of shard file `index` of a 1-D array (zarr v3 default chunk key encoding)."""
    return f"{array_path}/c/{index}"


def array_spec(kv_spec: dict[str, Any], path: str, dtype: np.dtype, *, shard_values: int,
               chunk_values: int, create: bool,
               compression_level: int = DEFAULT_COMPRESSION_LEVEL,
               codec: str = DEFAULT_CODEC,
               attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    """tensorstore spec of a 1-D zarr v3 array under the store root `kv_spec` (`attributes`:
    the array's zarr attributes, e.g. its AnnData encoding)."""
    kv = dict(kv_spec)
    kv["path"] = kv_spec.get("path", "") + path + "/"
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": kv}
    if not create:
        return spec
    dtype = np.dtype(dtype)
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}] if dtype.itemsize > 1 \
        else [{"name": "bytes"}]
    inner += [
        {"name": "blosc", "configuration": {
            "cname": codec, "clevel": compression_level if codec == "zstd" else min(compression_level, 9), "typesize": dtype.itemsize,
            "shuffle": "shuffle" if dtype.itemsize > 1 else "noshuffle"}},
        {"name": "crc32c"},
    ]
    spec["metadata"] = {
        "shape": [0],
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_values]}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [chunk_values],
            "codecs": inner,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                             {"name": "crc32c"}],
            "index_location": "end",
        }}],
    }
    if attributes:
        spec["metadata"]["attributes"] = attributes
    spec["create"] = True
    # NOTE: every shard must exist on disk (the manifest hashes each one); by default
    # tensorstore skips chunks equal to the fill value (e.g. all-zero codes).
    spec["store_data_equal_to_fill_value"] = True
    return spec


# --- AnnData string arrays (format v2) ------------------------------------------------------------
# zarr v3 `string` arrays with the `vlen-utf8` codec, as anndata and zarr-python write them.
# tensorstore has no string data type, so these chunks are encoded and decoded here, with the
# codecs zarr-python uses (numcodecs' VLenUTF8 and Zstd, google_crc32c): vlen-utf8 -> zstd ->
# crc32c, one file per chunk of whole strings (no sharding: tables are small next to X).


def string_array_meta(n: int, chunk: int, level: int) -> dict[str, Any]:
    """zarr.json of a 1-D string array of `n` strings in chunks of `chunk`."""
    return {"zarr_format": 3, "node_type": "array", "shape": [n], "data_type": "string",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": "",
            "codecs": [{"name": "vlen-utf8", "configuration": {}},
                       {"name": "zstd", "configuration": {"level": level, "checksum": False}},
                       {"name": "crc32c"}],
            "attributes": anndata_encoding("string-array")}


def encode_string_chunk(values: np.ndarray, chunk: int, level: int) -> bytes:
    """One chunk file: `values` (at most `chunk` str, padded with "" as zarr's regular grid
    wants whole chunks) through vlen-utf8, zstd and crc32c."""
    import google_crc32c
    from numcodecs import VLenUTF8, Zstd

    full = np.full(chunk, "", dtype=object)
    full[:len(values)] = values
    body = Zstd(level=level).encode(VLenUTF8().encode(full))
    return bytes(body) + int(google_crc32c.value(bytes(body))).to_bytes(4, "little")


def decode_string_chunk(blob: bytes, where: str) -> np.ndarray:
    """The str of one chunk file (object array); StoreError naming `where` on a bad checksum."""
    import google_crc32c
    from numcodecs import VLenUTF8, Zstd

    body = blob[:-4]
    if len(blob) < 4 or int(google_crc32c.value(body)) != int.from_bytes(blob[-4:], "little"):
        raise StoreError(f"{where}: checksum mismatch (corrupt chunk; run `pertscale verify`)")
    return VLenUTF8().decode(Zstd().decode(body))


def read_strings(kv: ts.KvStore, path: str, rows: np.ndarray | None = None) -> np.ndarray:
    """The string array at `path` (object array of str), or only its `rows`: only the chunks
    that hold them are read, all in flight at once. A missing chunk is a StoreError."""
    meta = read_json(kv, f"{path}/zarr.json")
    where = _kv_endpoint(kv) or kv.spec().to_json().get("path", "")
    if meta is None:
        raise StoreError(f"{where}: cannot open array {path} ({path}/zarr.json is missing)")
    if meta.get("data_type") != "string":
        raise StoreError(f"{where}: cannot read array {path}: it is not a string array")
    n = int(meta["shape"][0])
    chunk = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
    wanted = np.arange(-(-n // chunk)) if rows is None else np.unique(np.asarray(rows) // chunk)
    futures = [(int(c), kv.read(f"{path}/c/{int(c)}")) for c in wanted]
    parts = {}
    for c, fut in futures:
        res = wait(fut, _kv_endpoint(kv))
        key = f"{path}/c/{c}"
        if res.state != "value":
            raise StoreError(f"{where}: cannot read array {path}: chunk {key} is missing (run "
                             "`pertscale verify`)")
        parts[c] = decode_string_chunk(bytes(res.value), f"{where}{key}")
    if rows is None:
        out = np.concatenate([parts[int(c)] for c in wanted]) if len(wanted) \
            else np.zeros(0, object)
        return out[:n].copy() if len(out) > n else out  # not a view of the padded chunk
    rows = np.asarray(rows, dtype=np.int64)
    return np.array([parts[int(r // chunk)][int(r % chunk)] for r in rows], dtype=object)


# --- column encodings (format v1) ----------------------------------------------------------------
# A DataFrame column is one of:
#   numeric      array `<group>/<name>` of its dtype (bool, ints, floats)
#   categorical  array `<group>/<name>` of int32 codes (-1 = missing) + categories in group attrs
#   string       arrays `<group>/<name>/offsets` int64 [n+1] and `<group>/<name>/bytes` uint8 (utf-8)
# The group's attributes hold {"columns": [names in order], "encodings": {name: {...}}}.


def decode_strings(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Object array of str from utf-8 bytes + int64 offsets (one pyarrow large_string array
    over the two buffers, no per-string Python slicing)."""
    import pyarrow as pa

    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    arr = pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets),
                                           pa.py_buffer(np.ascontiguousarray(data, np.uint8)))
    return arr.to_numpy(zero_copy_only=False).astype(object)


def decode_column(enc: dict[str, Any], read: Any, name: str) -> Any:
    """Rebuild a column from its encoding; `read(path)` returns the array stored at `path`."""
    kind = enc["encoding"]
    if kind == "numeric":
        return read(name).astype(enc["dtype"], copy=False)
    if kind == "categorical":
        codes = read(name).astype(np.int32, copy=False)
        return pd.Categorical.from_codes(codes, categories=pd.Index(enc["categories"]),
                                         ordered=bool(enc.get("ordered", False)))
    if kind == "string":
        return decode_strings(read(f"{name}/offsets"), read(f"{name}/bytes"))
    raise StoreError(f"column {name!r} has unknown encoding {kind!r}")
