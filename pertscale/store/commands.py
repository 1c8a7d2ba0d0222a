"""CLI entries: `pertscale ingest | stats | verify | info | migrate` (each takes argv, returns
an exit code)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pertscale.paths import make_dir
from pertscale.store.format import CODECS, local_path
from pertscale.store.ingest import ORDERS, VALUE_KINDS, IngestConfig, ingest
from pertscale.store.reader import open_store, read_store_attrs
from pertscale.store.stats import FLAVORS, highly_variable_genes, size_factors
from pertscale.store.verify import VERIFY_LEVELS, verify_store

__all__ = ["dir_size", "info_main", "ingest_main", "migrate_main", "stats_main", "verify_main"]


def dir_size(path: str | Path) -> int:
    """Total bytes of the files under a local directory."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def ingest_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pertscale ingest", description=(
        "Ingest .h5ad files into a cell store (one input) or a collection (several inputs)."))
    p.add_argument("inputs", nargs="+", help=".h5ad files")
    p.add_argument("--out", required=True, help="output store directory")
    p.add_argument("--values", choices=VALUE_KINDS, default="raw_counts",
                   help="what the matrix holds; raw_counts are validated as integers >= 0")
    p.add_argument("--counts-from", default="X", help="X, raw (.raw.X) or layer:NAME")
    p.add_argument("--obs-columns", default=None,
                   help="comma-separated obs columns to carry over (default: all)")
    p.add_argument("--gene-id-column", default="",
                   help="var column of gene ids, e.g. gene_ids (default: the var index)")
    p.add_argument("--gene-symbol-column", default="", help="var column of gene symbols")
    p.add_argument("--block-rows", type=int, default=IngestConfig.block_rows)
    p.add_argument("--chunk-values", type=int, default=IngestConfig.chunk_values)
    p.add_argument("--shard-values", type=int, default=IngestConfig.shard_values)
    p.add_argument("--compression-level", type=int, default=IngestConfig.compression_level,
                   help="zstd level, 1-22")
    p.add_argument("--codec", choices=CODECS, default=IngestConfig.codec,
                   help="blosc codec of X: zstd (smaller, object storage) or lz4 (faster local reads)")
    p.add_argument("--order", choices=ORDERS, default=IngestConfig.order,
                   help="cell order of the store: shuffled (seeded random order, default; each "
                        "cell's file row kept in obs 'source_row') or source (the file's order)")
    p.add_argument("--seed", type=int, default=IngestConfig.seed, help="seed of the shuffle")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a complete store of other data at --out")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    cfg = IngestConfig(
        values=args.values, counts_from=args.counts_from,
        obs_columns=[c for c in args.obs_columns.split(",") if c] if args.obs_columns else None,
        gene_id_column=args.gene_id_column, gene_symbol_column=args.gene_symbol_column,
        block_rows=args.block_rows,
        chunk_values=args.chunk_values, shard_values=args.shard_values,
        compression_level=args.compression_level, codec=args.codec, order=args.order,
        seed=args.seed, overwrite=args.overwrite)

    shown = False

    def progress(name: str, done: int, total: int) -> None:
        nonlocal shown
        if not args.quiet:
            print(f"\r{name}: {done}/{total} cells", end="", file=sys.stderr, flush=True)
            shown = True

    t0 = time.perf_counter()
    try:
        attrs = ingest(args.inputs, args.out, cfg, progress=progress)
    finally:
        if shown:  # end the progress line, also before an error's line
            print(file=sys.stderr)
    seconds = time.perf_counter() - t0
    size = dir_size(args.out)
    print(f"store {args.out}: {attrs['n_cells']} cells x {attrs['n_genes']} genes, "
          f"nnz {attrs['nnz']}, {'raw counts' if attrs['raw_counts'] else 'normalised'}, "
          f"{size / 2**20:.1f} MiB, {attrs['n_cells'] / max(seconds, 1e-9):,.0f} cells/s")
    return 0


def stats_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pertscale stats", description=(
        "Size factors and highly variable genes from a store's per-gene statistics."))
    p.add_argument("store")
    p.add_argument("--flavor", choices=sorted(FLAVORS), default="seurat")
    p.add_argument("--n-top-genes", type=int, default=None,
                   help="number of HVGs (seurat default: scanpy's cutoffs; seurat_v3: 2000)")
    p.add_argument("--target-sum", type=float, default=None,
                   help="size factor = n_counts / target_sum (default: median n_counts)")
    p.add_argument("--out", default=None,
                   help="directory for hvg.csv and size_factors.csv")
    args = p.parse_args(argv)
    if args.n_top_genes is not None and args.n_top_genes < 1:
        raise ValueError(f"--n-top-genes={args.n_top_genes} must be >= 1")
    store = open_store(args.store)
    if args.n_top_genes is not None and args.n_top_genes > store.n_genes:
        raise ValueError(f"--n-top-genes={args.n_top_genes} is more than the {store.n_genes} "
                         f"genes of store {args.store}")
    out = Path(args.out) if args.out else None
    if out is not None:
        make_dir(out)  # before the work: a bad --out fails first
    kwargs = {} if args.n_top_genes is None else {"n_top_genes": args.n_top_genes}
    hvg = highly_variable_genes(store, args.flavor, **kwargs)
    sf = size_factors(store, args.target_sum)
    empty = int((sf == 0).sum())
    if empty:
        print(f"warning: {empty} of {len(sf)} cells have no counts: their size factor is 0 "
              "(filter them before normalising)", file=sys.stderr)
    hv = hvg.index[hvg["highly_variable"]]
    print(f"store {args.store}: {store.n_cells} cells x {store.n_genes} genes")
    print(f"size factors: min {sf.min():.4g}  median {sf.median():.4g}  max {sf.max():.4g}")
    print(f"highly variable genes ({args.flavor}): {len(hv)}")
    print(" ".join(map(str, hv[:50])) + (" ..." if len(hv) > 50 else ""))
    if out is not None:
        hvg.to_csv(out / "hvg.csv", index_label="gene_id")
        sf.to_csv(out / "size_factors.csv", index_label="cell_id")
        print(f"wrote {out / 'hvg.csv'} and {out / 'size_factors.csv'}")
    return 0


def verify_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pertscale verify", description=(
        "Check every shard of a store against the checksums written at commit."))
    p.add_argument("store")
    p.add_argument("--level", choices=VERIFY_LEVELS, default="full",
                   help="full: hash every shard; metadata: documents, fingerprint and every "
                        "shard file present with its size (what a training job checks)")
    args = p.parse_args(argv)
    report = verify_store(args.store, args.level)
    if report.ok:
        print(f"ok: {args.store}: {report.num_shards} shards, "
              f"{report.num_bytes / 2**20:.1f} MiB verified ({args.level})")
        return 0
    for problem in report.problems:
        print(f"pertscale verify: {problem}", file=sys.stderr)
    print(f"FAILED: {args.store}: {len(report.problems)} problem(s)", file=sys.stderr)
    return 1


def migrate_main(argv: list[str]) -> int:
    from pertscale.store.migrate import migrate

    p = argparse.ArgumentParser(prog="pertscale migrate", description=(
        "Rewrite a format-v1 store (or every member of a collection) as format v2, which "
        "anndata and scanpy open: X's shard files are kept as they are (hard links), the "
        "tables are rewritten; the old store is replaced only once the new one is committed."))
    p.add_argument("store")
    args = p.parse_args(argv)
    for line in migrate(args.store):
        print(line)
    return 0


def info_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pertscale info", description="Print a store's metadata.")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print all attributes as JSON")
    args = p.parse_args(argv)
    attrs = read_store_attrs(args.store)
    if args.json:
        print(json.dumps(attrs, indent=1))
        return 0
    skip = {"manifest", "genes"}
    for key, value in attrs.items():
        if key not in skip:
            print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if local_path(args.store) is not None:
        print(f"size_bytes: {dir_size(local_path(args.store))}")
    return 0
