"""Verify a store: every shard file against the sha256 manifest written at commit, every
metadata document (group and array zarr.json) against its recorded sha256, and the root
attributes against the fingerprint.

The zarr codecs already carry crc32c checksums (shard index and every inner chunk), which catch
corruption when a chunk is read; `verify` checks whole files up front and names the array and
shard file of every problem (missing file, size change, content change).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Any

from pertscale.store.format import (
    COLLECTION_NAME,
    StoreError,
    StoreUnreachable,
    content_fingerprint,
    join_uri,
    list_keys,
    local_path,
    metadata_keys,
    open_kvstore,
)
from pertscale.store.reader import read_store_attrs

__all__ = ["VERIFY_LEVELS", "VerifyReport", "verify_store"]

READS_IN_FLIGHT = 16  # shard files read at once
VERIFY_LEVELS = ("full", "metadata")


@dataclasses.dataclass
class VerifyReport:
    """Outcome of `verify_store`: `ok` when `problems` is empty."""

    uri: str
    num_shards: int = 0
    num_bytes: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _verify_manifest(uri: str, manifest: dict[str, list[dict[str, Any]]],
                     report: VerifyReport, prefix: str = "") -> None:
    """Hash every shard file, with at most READS_IN_FLIGHT reads outstanding (bounded memory,
    overlapped I/O), problems in manifest order."""
    kv = open_kvstore(uri)
    pending: collections.deque = collections.deque()

    def check(array: str, entry: dict[str, Any], future: Any) -> None:
        key = entry["key"]
        where = f"array {prefix}{array}: shard {prefix}{key}"
        res = future.result()
        if res.state != "value":
            report.problems.append(f"{where} is missing")
            return
        blob = bytes(res.value)
        report.num_shards += 1
        report.num_bytes += len(blob)
        if len(blob) != entry["size"]:
            report.problems.append(f"{where} has {len(blob)} bytes, expected {entry['size']}")
        elif hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            report.problems.append(f"{where} is corrupt (sha256 mismatch)")

    for array, entries in sorted(manifest.items()):
        for entry in entries:
            pending.append((array, entry, kv.read(entry["key"])))
            if len(pending) >= READS_IN_FLIGHT:
                check(*pending.popleft())
    while pending:
        check(*pending.popleft())


def _check_shards_present(uri: str, manifest: dict[str, list[dict[str, Any]]],
                          report: VerifyReport, prefix: str = "") -> None:
    """The fast check: every shard file exists (one listing) and, on a local disk, has its
    recorded size; contents are left to the crc32c of every chunk read."""
    present = set(list_keys(open_kvstore(uri)))
    root = local_path(uri)
    for array, entries in sorted(manifest.items()):
        for entry in entries:
            key = entry["key"]
            where = f"array {prefix}{array}: shard {prefix}{key}"
            report.num_shards += 1
            report.num_bytes += entry["size"]
            if key not in present:
                report.problems.append(f"{where} is missing")
                continue
            size = (root / key).stat().st_size if root is not None else entry["size"]
            if size != entry["size"]:
                report.problems.append(f"{where} has {size} bytes, expected {entry['size']}")


def verify_store(uri: str, level: str = "full") -> VerifyReport:
    """Check the store (or every member of a collection) at `uri`: "full" hashes every shard;
    "metadata" checks the metadata documents, the fingerprint and that every shard file is
    there (with its size, on a local disk), without reading the shards."""
    uri = str(uri)
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify level {level!r} is not one of {list(VERIFY_LEVELS)}")
    report = VerifyReport(uri)
    try:
        attrs = read_store_attrs(uri)
    except StoreUnreachable:
        raise  # the endpoint, not the store: an error of the command
    except StoreError as e:
        report.problems.append(str(e))
        return report
    if attrs["pertscale_format"] == COLLECTION_NAME:
        for member in attrs["members"]:
            sub = verify_store(join_uri(uri, member["path"]), level)
            report.num_shards += sub.num_shards
            report.num_bytes += sub.num_bytes
            report.problems += [f"member {member['path']}: {p}" for p in sub.problems]
            if sub.ok and _member_fingerprint(uri, member) != member["fingerprint"]:
                report.problems.append(f"member {member['path']} was replaced after the "
                                       "collection was written")
        return report
    if level == "full":
        _verify_manifest(uri, attrs["manifest"], report)
    else:
        _check_shards_present(uri, attrs["manifest"], report)
    _verify_metadata(uri, attrs, report)
    return report


def _verify_metadata(uri: str, attrs: dict[str, Any], report: VerifyReport) -> None:
    recorded = attrs.get("metadata")
    if recorded is None:
        report.problems.append("the store has no metadata checksums (written by an older "
                               "pertscale): re-ingest it to verify its metadata")
        return
    kv = open_kvstore(uri)
    present = metadata_keys(kv)
    for key in sorted(set(present) - set(recorded)):
        report.problems.append(f"metadata document {key} was added after the commit")
    for key, digest in sorted(recorded.items()):
        res = kv.read(key).result()
        if res.state != "value":
            report.problems.append(f"metadata document {key} is missing")
        elif hashlib.sha256(bytes(res.value)).hexdigest() != digest:
            report.problems.append(f"metadata document {key} was changed after the commit "
                                   f"(sha256 mismatch)")
    if content_fingerprint(attrs) != attrs.get("fingerprint"):
        report.problems.append("root attributes (zarr.json) were changed after the commit "
                               "(fingerprint mismatch)")


def _member_fingerprint(uri: str, member: dict[str, Any]) -> str:
    return read_store_attrs(join_uri(uri, member["path"]))["fingerprint"]
