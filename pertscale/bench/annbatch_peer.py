"""annbatch side of `pertscale bench loader --peer annbatch`: run as a script by another Python.

annbatch needs Python >= 3.12 and its own dependencies, so the bench runs this file with the
interpreter given by `--peer-python` (a venv with annbatch installed); it imports nothing from
pertscale. Its input is the benchmark's source: the cells in their source order (three .npy
files exported from our store, so both loaders read identical cells) with each cell's source row
and label. As annbatch's users do, it writes the source as an .h5ad and then annbatch's own
pre-shuffled collection from it (`DatasetCollection.add_adatas`, annbatch's defaults: shuffled,
blosc-lz4) in a `--write-only` run; each loader run then times annbatch's `Loader` with
shuffled chunks over the collection, appends every batch's source rows to `--batches-out`
(int64) and prints one JSON object on stdout. With `--anndata-store STORE`, the loader run
reads a pertscale store (format v2, an AnnData zarr store) directly instead, the very files our
loader reads, and writes the batches' store rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited via exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write(npy_dir: Path, store_dir: Path, seed: int) -> tuple[float, float]:
    """The source as .h5ad, then annbatch's shuffled collection from it: (h5ad s, collection s)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from annbatch import DatasetCollection

    indptr = np.load(npy_dir / "indptr.npy")
    indices = np.load(npy_dir / "indices.npy")
    data = np.load(npy_dir / "data.npy")
    meta = json.loads((npy_dir / "shape.json").read_text())
    x = sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, int(meta["n_genes"])))
    obs = pd.DataFrame({"source_row": np.arange(x.shape[0], dtype=np.int64)},
                       index=[str(i) for i in range(x.shape[0])])
    if (npy_dir / "labels.npy").exists():
        obs["label"] = pd.Categorical.from_codes(np.load(npy_dir / "labels.npy"),
                                                 meta["label_categories"])
    source = npy_dir / "source.h5ad"
    t0 = time.perf_counter()
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(x.shape[1])])) \
        .write_h5ad(source)
    t1 = time.perf_counter()
    DatasetCollection(store_dir).add_adatas([source], rng=np.random.default_rng(seed))
    return t1 - t0, time.perf_counter() - t1


def _run(store_dir: Path, *, batch_size: int, chunk_size: int, preload_nchunks: int,
         max_batches: int, seed: int, batches_out: Path, anndata_store: Path | None) -> dict:
    import anndata as ad
    import numpy as np
    import zarr
    from annbatch import DatasetCollection, Loader
    from annbatch.samplers import RandomSampler

    if anndata_store is None:
        collection = DatasetCollection(store_dir, mode="r")
        # batch["index"] is the position over the datasets in the order added, as in obs()
        source_row = collection.obs(columns=["source_row"])["source_row"].to_numpy(np.int64)
        groups = list(collection)
    else:  # one AnnData zarr store: batch["index"] is its row
        groups = [zarr.open_group(anndata_store, mode="r")]
        source_row = np.arange(groups[0]["X"].attrs["shape"][0], dtype=np.int64)
    sampler = RandomSampler(chunk_size=chunk_size, preload_nchunks=preload_nchunks,
                            batch_size=batch_size, drop_last=True,
                            rng=np.random.default_rng(seed))
    # record the chunk slices annbatch reads: a batch's store blocks are counted exactly
    # (its chunks are not aligned to multiples of chunk_size after the short one)
    chunk_starts: list[int] = []
    sample = sampler.sample

    def recording(n_obs):
        for request in sample(n_obs):
            chunk_starts.extend(int(sl.start) for sl in request["requests"])
            yield request

    sampler.sample = recording
    loader = Loader(batch_sampler=sampler, return_index=True, preload_to_gpu=False)
    for group in groups:
        loader.add_dataset(ad.io.sparse_dataset(group["X"]))
    cells = nnz = 0
    batch_index, sizes = [], []
    out = open(batches_out, "wb")  # noqa: SIM115 (closed after the timed loop)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        xb = batch["X"]
        cells += xb.shape[0]
        nnz += xb.nnz
        index = np.asarray(batch["index"])
        batch_index.append(index)
        sizes.append(len(index))
        out.write(source_row[index].tobytes())
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    out.close()
    bounds = np.unique(chunk_starts)
    distinct = [len(np.unique(np.searchsorted(bounds, idx, side="right"))) for idx in batch_index]
    return {"cells": cells, "nnz": nnz, "seconds": seconds, "cpu_seconds": cpu,
            "cells_per_s": cells / seconds, "mb_per_s": nnz * 8 / seconds / 1e6,
            "cells_per_cpu_s": cells / cpu, "batch_sizes": sizes,
            "blocks_per_batch": float(np.mean(distinct)), "peak_rss_mb": _peak_rss_mb()}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--npy-dir", type=Path, required=True)
    p.add_argument("--store-dir", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--preload-nchunks", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=10**9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches-out", type=Path)
    p.add_argument("--anndata-store", type=Path,
                   help="read this AnnData zarr store (a pertscale v2 store) instead")
    p.add_argument("--write-only", action="store_true",
                   help="write the collection and exit (the loader runs measure only reading)")
    args = p.parse_args(argv)
    import annbatch

    if args.write_only:
        h5ad_s, write_s = _write(args.npy_dir, args.store_dir, args.seed)
        print(json.dumps({"h5ad_write_seconds": h5ad_s, "write_seconds": write_s,
                          "write_peak_rss_mb": _peak_rss_mb()}))
        return 0
    if args.batches_out is None:
        p.error("--batches-out is required for a loader run")
    result = _run(args.store_dir, batch_size=args.batch_size, chunk_size=args.chunk_size,
                  preload_nchunks=args.preload_nchunks, max_batches=args.max_batches,
                  seed=args.seed, batches_out=args.batches_out,
                  anndata_store=args.anndata_store)
    result.update(annbatch_version=annbatch.__version__,
                  chunk_size=args.chunk_size, preload_nchunks=args.preload_nchunks,
                  batch_size=args.batch_size)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
