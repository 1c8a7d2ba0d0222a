"""Embedding tables: every format reads to the same table; bad tables fail with clear errors."""

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pertscale.data.embeddings import load_embeddings

REAL_NPZ = Path(__file__).resolve().parents[2] / "../shared/data/gene_emb/minilm_orghs_text_demo.npz"
GENES = ["TP53", "MYC", "KLF1"]
EMB = np.arange(12, dtype=np.float32).reshape(3, 4) + 1


def _frame():
    return pd.DataFrame({"gene": GENES, **{f"d{i}": EMB[:, i] for i in range(4)}})


WRITERS = {
    "t.npz": lambda p: np.savez(p, genes=np.array(GENES), emb=EMB),
    "t.csv": lambda p: _frame().to_csv(p, index=False),
    "t.tsv.gz": lambda p: _frame().to_csv(p, index=False, sep="\t"),
    "t.parquet": lambda p: _frame().to_parquet(p),
    "t.pkl": lambda p: p.write_bytes(pickle.dumps({g: list(v) for g, v in zip(GENES, EMB)})),
}


@pytest.mark.parametrize("name", WRITERS)
def test_every_format_reads_the_same_table(tmp_path, name):
    path = tmp_path / name
    WRITERS[name](path)
    table = load_embeddings(path, allow_pickle=name.endswith(".pkl"))
    assert table.genes == GENES
    np.testing.assert_array_equal(table.emb_ND, EMB)
    assert table.dim == 4 and len(table) == 3 and "MYC" in table
    assert table.missing(["MYC", "GATA1"]) == ["GATA1"]
    assert len(table.sha256) == 64


def test_pickle_needs_opt_in(tmp_path):
    path = tmp_path / "genept.pickle"
    WRITERS["t.pkl"](path)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_embeddings(path)


def test_named_gene_column(tmp_path):
    frame = _frame()[["d0", "gene", "d1"]]
    frame.to_csv(tmp_path / "t.csv", index=False)
    table = load_embeddings(tmp_path / "t.csv", gene_column="gene")
    assert table.genes == GENES and table.dim == 2
    with pytest.raises(ValueError, match="no gene column 'symbol'"):
        load_embeddings(tmp_path / "t.csv", gene_column="symbol")


def test_bad_tables(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_embeddings(tmp_path / "nope.npz")
    (tmp_path / "t.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown format"):
        load_embeddings(tmp_path / "t.h5")
    np.savez(tmp_path / "k.npz", names=np.array(GENES), emb=EMB)
    with pytest.raises(ValueError, match=r"'genes' and 'emb'.*\['emb', 'names'\]"):
        load_embeddings(tmp_path / "k.npz")
    np.savez(tmp_path / "d.npz", genes=np.array(["A", "A", "B"]), emb=EMB)
    with pytest.raises(ValueError, match=r"duplicate genes \['A'\]"):
        load_embeddings(tmp_path / "d.npz")
    bad = EMB.copy()
    bad[1, 2] = np.nan
    np.savez(tmp_path / "n.npz", genes=np.array(GENES), emb=bad)
    with pytest.raises(ValueError, match=r"non-finite.*\['MYC'\]"):
        load_embeddings(tmp_path / "n.npz")
    frame = _frame()
    frame["d2"] = "x"
    frame.to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(ValueError, match=r"non-numeric.*\['d2'\]"):
        load_embeddings(tmp_path / "s.csv")
    (tmp_path / "p.pkl").write_bytes(pickle.dumps({"A": [1.0, 2.0], "B": [1.0]}))
    with pytest.raises(ValueError, match="different lengths"):
        load_embeddings(tmp_path / "p.pkl", allow_pickle=True)


def test_real_gene_text_table():
    if not REAL_NPZ.is_file():
        pytest.skip(f"real embedding table {REAL_NPZ} is absent")
    table = load_embeddings(REAL_NPZ)
    assert len(table) == 788 and table.dim == 384
    assert table.emb_ND.dtype == np.float32
