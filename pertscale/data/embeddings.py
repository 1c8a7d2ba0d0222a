"""Gene -> vector tables read from files (GenePT, gene-text embeddings, a pretrained model's
gene table exported to disk, or any user table).

Formats, chosen by file suffix:
    .npz                 arrays `genes` (str [N]) and `emb` (float [N, D])
    .csv / .tsv (.gz)    a header row; the gene column (first column unless `gene_column` is
                         given), then one numeric column per dimension
    .parquet             the same layout as the CSV
    .pkl / .pickle       GenePT's dict gene -> list of floats. Only with `allow_pickle=True`:
                         unpickling runs code from the file, so it must be a trusted file.

Every table is checked: unique gene names, one dimension for all rows, finite values. Errors
name the file and the offending genes / columns.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from pertscale.checksums import file_sha256

__all__ = ["EMBEDDING_SUFFIXES", "GeneEmbeddings", "file_sha256", "load_embeddings"]

EMBEDDING_SUFFIXES = (".npz", ".csv", ".tsv", ".csv.gz", ".tsv.gz", ".parquet", ".pkl",
                      ".pickle")


@dataclasses.dataclass
class GeneEmbeddings:
    """A gene embedding table: `genes[i]` has the vector `emb_ND[i]`."""

    genes: list[str]
    emb_ND: np.ndarray
    source: str = ""
    sha256: str = ""
    _row: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._row = {g: i for i, g in enumerate(self.genes)}

    @property
    def dim(self) -> int:
        return int(self.emb_ND.shape[1])

    def __len__(self) -> int:
        return len(self.genes)

    def __contains__(self, gene: str) -> bool:
        return gene in self._row

    def missing(self, genes: list[str] | set[str]) -> list[str]:
        """The given genes that have no row, sorted."""
        return sorted(g for g in set(genes) if g not in self._row)




def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(EMBEDDING_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"embedding table {path}: unknown format; expected one of "
                     f"{list(EMBEDDING_SUFFIXES)}")


def _read_npz(path: Path) -> tuple[list[str], np.ndarray]:
    import zipfile

    if not zipfile.is_zipfile(path):  # numpy would answer with advice about pickles
        raise ValueError(f"embedding table {path}: not an .npz archive (numpy's savez writes "
                         "a zip of arrays 'genes' and 'emb')")
    with np.load(path, allow_pickle=False) as z:
        keys = sorted(z.files)
        if "genes" not in keys or "emb" not in keys:
            raise ValueError(f"embedding table {path}: an .npz needs arrays 'genes' and 'emb'; "
                             f"found {keys}")
        return [str(g) for g in z["genes"]], np.asarray(z["emb"])


def _read_frame(frame: pd.DataFrame, path: Path, gene_column: str | None):
    if frame.shape[1] < 2:
        raise ValueError(f"embedding table {path}: needs a gene column and at least one "
                         f"dimension column; found columns {list(frame.columns)}")
    gene_column = gene_column or str(frame.columns[0])
    if gene_column not in frame.columns:
        raise ValueError(f"embedding table {path}: no gene column {gene_column!r}; columns "
                         f"start with {list(frame.columns[:5])}")
    values = frame.drop(columns=[gene_column])
    non_numeric = [c for c in values.columns if not pd.api.types.is_numeric_dtype(values[c])]
    if non_numeric:
        raise ValueError(f"embedding table {path}: non-numeric dimension column(s) "
                         f"{non_numeric[:5]}")
    return frame[gene_column].astype(str).tolist(), values.to_numpy()


def _read_pickle(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open("rb") as f:
        table = pickle.load(f)
    if not isinstance(table, dict) or not table:
        raise ValueError(f"embedding table {path}: a pickle must hold a non-empty dict "
                         f"gene -> vector (GenePT's format), got {type(table).__name__}")
    genes = [str(g) for g in table]
    dims = {len(np.ravel(v)) for v in table.values()}
    if len(dims) != 1:
        raise ValueError(f"embedding table {path}: vectors have different lengths {sorted(dims)}")
    return genes, np.stack([np.ravel(np.asarray(v, dtype=np.float64)) for v in table.values()])


def load_embeddings(path: str | Path, *, allow_pickle: bool = False,
                    gene_column: str | None = None) -> GeneEmbeddings:
    """Read and check a gene embedding table (see the module docstring for formats)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding table {path} does not exist")
    suffix = _suffix(path)
    if suffix == ".npz":
        genes, emb = _read_npz(path)
    elif suffix in (".csv", ".csv.gz"):
        genes, emb = _read_frame(pd.read_csv(path), path, gene_column)
    elif suffix in (".tsv", ".tsv.gz"):
        genes, emb = _read_frame(pd.read_csv(path, sep="\t"), path, gene_column)
    elif suffix == ".parquet":
        genes, emb = _read_frame(pd.read_parquet(path), path, gene_column)
    else:
        if not allow_pickle:
            raise ValueError(
                f"embedding table {path} is a pickle; unpickling runs code from the file, so "
                f"it needs an explicit opt-in (allow_pickle=True / embeddings.allow_pickle = "
                f"true) for a file you trust, or convert it to .npz / .parquet")
        genes, emb = _read_pickle(path)
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(genes) or emb.shape[1] == 0:
        raise ValueError(f"embedding table {path}: {len(genes)} genes but embedding array of "
                         f"shape {emb.shape}")
    dup = pd.Index(genes)
    if dup.has_duplicates:
        raise ValueError(f"embedding table {path}: duplicate genes "
                         f"{sorted(set(dup[dup.duplicated()]))[:10]}")
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise ValueError(f"embedding table {path}: non-finite values for genes "
                         f"{[genes[i] for i in bad[:10]]}")
    return GeneEmbeddings(genes=genes, emb_ND=emb, source=str(path), sha256=file_sha256(path))
