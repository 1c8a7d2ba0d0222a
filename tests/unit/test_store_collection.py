"""Collections: several stores read as one in a union gene space; GeneVocab; kvstore specs."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertscale.store import GeneVocab, StoreError, kvstore_spec, open_store
from pertscale.store.ingest import IngestConfig, ingest
from pertscale.store.shuffle import source_positions
from pertscale.store.verify import verify_store


def write_h5ad(path, genes, n, seed, cond):
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(rng.poisson(1.0, (n, len(genes))).astype(np.float32))
    obs = pd.DataFrame({"condition": pd.Categorical([cond] * n)},
                       index=[f"{path.stem}_{i}" for i in range(n)])
    ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return X


@pytest.fixture
def collection(tmp_path):
    xa = write_h5ad(tmp_path / "a.h5ad", ["G1", "G2", "G3", "G4"], 70, 0, "ctrl")
    xb = write_h5ad(tmp_path / "b.h5ad", ["G3", "G5", "G1"], 50, 1, "stim")
    cfg = IngestConfig(chunk_values=32, shard_values=128, block_rows=16)
    ingest([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "c", cfg)
    return tmp_path, xa, xb


def test_union_space_reads(collection):
    tmp_path, xa, xb = collection
    coll = open_store(tmp_path / "c")
    assert coll.vocab.genes == ["G1", "G2", "G3", "G4", "G5"]
    assert (coll.n_cells, coll.n_genes, coll.nnz) == (120, 5, xa.nnz + xb.nnz)
    dense = coll.read_csr(0, 120).toarray()
    # members are shuffled each on its own; the source order is the files' rows in order
    positions = source_positions(coll)
    assert sorted(positions[:70]) == list(range(70)) and sorted(positions[70:]) == \
        list(range(70, 120))
    assert (positions[:50] - 0 != positions[70:] - 70).any()  # members' own seeds
    in_source = dense[np.argsort(positions)]
    np.testing.assert_array_equal(in_source[:70, :4], xa.toarray())
    np.testing.assert_array_equal(in_source[:70, 4], 0)
    np.testing.assert_array_equal(in_source[70:, [2, 4, 0]], xb.toarray())
    np.testing.assert_array_equal(in_source[70:, [1, 3]], 0)
    across = coll.read_csr_async(60, 80).result()  # spans both members
    assert across.has_sorted_indices and across.indices.dtype == np.int32
    np.testing.assert_array_equal(across.toarray(), dense[60:80])
    np.testing.assert_array_equal(np.diff(coll.read_indptr(0, 120)),
                                  np.diff(coll.read_csr(0, 120).indptr))
    np.testing.assert_array_equal(coll.read_indptr(65, 75), coll.read_indptr(0, 120)[65:76])
    obs = coll.obs
    assert len(obs) == 120 and list(obs["dataset"].cat.categories) == ["a", "b"]
    assert list(obs["condition"].cat.categories) == ["ctrl", "stim"]
    np.testing.assert_allclose(coll.gene_stats()["sum"], dense.sum(0))
    assert verify_store(tmp_path / "c").ok


def test_rerun_resumes_members_and_detects_changes(collection):
    tmp_path, _, _ = collection
    fp = open_store(tmp_path / "c").fingerprint
    cfg = IngestConfig(chunk_values=32, shard_values=128, block_rows=16)
    assert ingest([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "c", cfg)[
        "fingerprint"] == fp
    member = next((tmp_path / "c" / "members").iterdir())
    (member / "X" / "data" / "c" / "0").unlink()
    report = verify_store(tmp_path / "c")
    assert report.problems[0].startswith(f"member members/{member.name}: array X/data")


def test_mixed_value_kinds_rejected(tmp_path):
    write_h5ad(tmp_path / "a.h5ad", ["G1"], 5, 0, "x")
    ingest([tmp_path / "a.h5ad"], tmp_path / "c/members/000-a", IngestConfig())
    ingest([tmp_path / "a.h5ad"], tmp_path / "c/members/001-b", IngestConfig(values="normalised"))
    from pertscale.store.collection import write_collection
    with pytest.raises(ValueError, match="mix raw counts and normalised"):
        write_collection(str(tmp_path / "c"), ["members/000-a", "members/001-b"])


def test_gene_vocab(tmp_path):
    vocab = GeneVocab(["ENSG1", "ENSG2"])
    assert vocab.tokens == ["<pad>", "<cls>", "<mask>", "ENSG1", "ENSG2"] and len(vocab) == 5
    assert vocab.token_id("<mask>") == 2 and vocab.token_id("ENSG2") == 4
    with pytest.raises(KeyError, match="'ENSG9' is not in the gene vocabulary"):
        vocab.token_id("ENSG9")
    vocab.save(tmp_path / "v.json")
    assert GeneVocab.load(tmp_path / "v.json") == vocab
    with pytest.raises(ValueError, match="duplicate gene 'A'"):
        GeneVocab(["A", "B", "A"])
    with pytest.raises(ValueError, match="duplicate special token"):
        GeneVocab(["<cls>"])


def test_kvstore_spec_from_uri(monkeypatch, tmp_path):
    assert kvstore_spec(str(tmp_path)) == {"driver": "file", "path": f"{tmp_path}/"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:5555")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    spec = kvstore_spec("s3://cells/stores/kang")
    assert spec == {"driver": "s3", "bucket": "cells", "path": "stores/kang/",
                    "endpoint": "http://127.0.0.1:5555", "aws_region": "eu-west-1"}
    assert "s3cr3t" not in repr(spec)
    assert kvstore_spec("gs://b/p") == {"driver": "gcs", "bucket": "b", "path": "p/"}
    with pytest.raises(StoreError, match="unsupported scheme 'hdfs'"):
        kvstore_spec("hdfs://x/y")


@pytest.mark.filterwarnings("ignore:Some cells have zero counts")
def test_collection_hvgs_equal_scanpy_on_union(collection):
    import scanpy as sc

    from pertscale.store.stats import highly_variable_genes

    tmp_path, _, _ = collection
    coll = open_store(tmp_path / "c")
    adata = ad.AnnData(coll.read_csr(0, coll.n_cells), var=coll.var.copy())
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    ref = sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=2, n_bins=2,
                                      inplace=False)
    ours = highly_variable_genes(coll, "seurat", n_top_genes=2, n_bins=2)
    np.testing.assert_array_equal(ours["highly_variable"].to_numpy(), ref["highly_variable"])
    np.testing.assert_allclose(ours["means"], ref["means"], rtol=1e-5)


def test_failed_overwrite_of_a_collection_keeps_it(collection):
    """--overwrite writes the new collection beside the old one: a member that fails half way
    leaves the old collection as it was (same fingerprint, verified), and no staging folder."""
    tmp_path, _, _ = collection
    fp = open_store(tmp_path / "c").fingerprint
    bad = tmp_path / "bad.h5ad"
    X = sp.csr_matrix(np.array([[1.0, -2.0], [0.0, 3.0]], dtype=np.float32))
    ad.AnnData(X, obs=pd.DataFrame({"condition": ["ctrl", "ctrl"]}, index=["x0", "x1"]),
               var=pd.DataFrame(index=["G1", "G2"])).write_h5ad(bad)
    cfg = IngestConfig(chunk_values=32, shard_values=128, block_rows=16, overwrite=True)
    with pytest.raises(ValueError, match="negative"):
        ingest([tmp_path / "a.h5ad", bad], tmp_path / "c", cfg)
    assert open_store(tmp_path / "c").fingerprint == fp and verify_store(tmp_path / "c").ok
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    ingest([tmp_path / "b.h5ad", tmp_path / "a.h5ad"], tmp_path / "c", cfg)
    assert open_store(tmp_path / "c").fingerprint != fp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_barcodes_shared_across_members_are_prefixed_by_member(tmp_path):
    """CELLxGENE files share barcodes: within a member ids are unique (the writer refuses
    duplicates); across members the collection's obs ids become <member>:<id>."""
    for name, seed in (("d1", 0), ("d2", 1)):
        rng = np.random.default_rng(seed)
        ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (5, 3)).astype(np.float32)),
                   obs=pd.DataFrame({"condition": ["ctrl"] * 5},
                                    index=[f"AAAC-{i}" for i in range(5)]),
                   var=pd.DataFrame(index=["G1", "G2", "G3"])).write_h5ad(tmp_path / f"{name}.h5ad")
    ingest([tmp_path / "d1.h5ad", tmp_path / "d2.h5ad"], tmp_path / "c",
           IngestConfig(order="source"))
    obs = open_store(tmp_path / "c").obs
    assert obs.index.is_unique and len(obs) == 10
    assert list(obs.index[:2]) == ["d1:AAAC-0", "d1:AAAC-1"] and obs.index[5] == "d2:AAAC-0"
    assert obs["dataset"].tolist() == ["d1"] * 5 + ["d2"] * 5


def test_the_same_file_twice_is_refused(collection):
    tmp_path, _, _ = collection
    with pytest.raises(ValueError, match=r"a.h5ad is given twice"):
        ingest([tmp_path / "a.h5ad", tmp_path / "b.h5ad", tmp_path / "." / "a.h5ad"],
               tmp_path / "twice", IngestConfig())
    assert not (tmp_path / "twice").exists()


def test_measured_genes_follow_each_member(collection):
    """A cell of a collection counts only the genes its member store measures (pathway_vae's
    loss): member a has G1-G4, member b has G1, G3, G5."""
    import torch

    from pertscale.constants import CELL_INDEX, GENE_MEASURED, INDICES, INDPTR, VALUES
    from pertscale.data.expression import ExpressionInputs, measured_genes

    tmp_path, _, _ = collection
    coll = open_store(tmp_path / "c")
    offsets, measured = measured_genes(coll)
    np.testing.assert_array_equal(offsets, [0, 70, 120])
    np.testing.assert_array_equal(measured, [[1, 1, 1, 1, 0], [1, 0, 1, 0, 1]])
    rows = np.array([3, 69, 70, 119])
    x = sp.vstack([coll.read_csr(r, r + 1) for r in rows]).tocsr()
    batch = {INDPTR: x.indptr.astype(np.int64), INDICES: x.indices, VALUES: x.data,
             CELL_INDEX: rows}
    out = ExpressionInputs(5, raw_counts=True, target="counts", max_seq_len=8,
                           measured=(offsets, measured))(batch, torch.Generator())
    np.testing.assert_array_equal(out[GENE_MEASURED].numpy(), measured[[0, 0, 1, 1]])
    assert measured_genes(coll.members[0]) is None  # a single store measures all its genes
