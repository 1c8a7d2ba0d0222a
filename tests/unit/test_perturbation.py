"""Perturbation labels, pseudo-bulk means and top DE genes read from a real cell store."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from pertscale.config import ConfigError
from pertscale.data.perturbation import (
    PerturbationConfig,
    load_perturbation_data,
    parse_perturbation,
)
from pertscale.store import StoreWriter, open_store

LABELS = ["ctrl"] * 40 + ["A"] * 30 + ["B+A"] * 25 + ["C+ctrl"] * 20 + ["-D"] * 3 + ["E"] * 1


@pytest.mark.parametrize("label, genes, signs, name", [
    ("KLF1", ("KLF1",), (1,), "KLF1"),
    ("MAP2K6+KLF1", ("KLF1", "MAP2K6"), (1, 1), "KLF1+MAP2K6"),
    ("KLF1+ctrl", ("KLF1",), (1,), "KLF1"),
    ("-TP53+MYC", ("MYC", "TP53"), (1, -1), "MYC+-TP53"),
    (" control ", (), (), "ctrl"),
])
def test_parse_labels(label, genes, signs, name):
    pert = parse_perturbation(label)
    assert (pert.genes, pert.signs, pert.name) == (genes, signs, name)
    assert pert.is_control == (not genes)
    assert pert.is_combo == (len(genes) > 1)


def test_parse_inhibition_sign_and_bad_labels():
    assert parse_perturbation("KLF1", sign=-1).signs == (-1,)
    assert parse_perturbation("-KLF1", sign=-1).signs == (1,)
    for bad, msg in [("", "empty"), ("A++B", "empty gene"), ("A+A", "twice")]:
        with pytest.raises(ValueError, match=msg):
            parse_perturbation(bad)


def _counts(seed=0):
    rng = np.random.default_rng(seed)
    n, g = len(LABELS), 30
    lam = rng.gamma(2.0, 2.0, size=g)
    x = rng.poisson(lam, size=(n, g)).astype(np.float32)
    x[np.array(LABELS) == "A", :5] *= 3  # a real effect on genes 0-4
    x[:, -1] += 1  # no cell without counts
    return x


@pytest.fixture
def store(tmp_path):
    x = _counts()
    order = np.random.default_rng(1).permutation(len(LABELS))  # stores are preshuffled
    obs = pd.DataFrame({"perturbation": np.array(LABELS)[order],
                        "cell_type": "t1"},
                       index=[f"c{i}" for i in order])
    var = pd.DataFrame({"gene_symbol": [f"G{i}" for i in range(x.shape[1])]},
                       index=[f"ENSG{i:05d}" for i in range(x.shape[1])])
    uri = str(tmp_path / "s.zarr")
    with StoreWriter(uri, var=var, raw_counts=True) as w:
        for lo in range(0, len(order), 50):
            w.append(sp.csr_matrix(x[order[lo:lo + 50]]), obs.iloc[lo:lo + 50])
    return open_store(uri), x


def test_pseudobulk_means_on_log_normalised_counts(store):
    src, x = store
    data = load_perturbation_data(src, PerturbationConfig(block_cells=32, max_in_flight=2))
    lognorm = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    labels = np.array(LABELS)
    assert data.perturbed == ["-D", "A", "A+B", "C"]
    assert data.dropped == {"E": 1}  # below min_cells=2, and listed
    assert "ctrl" in data.conditions.index and "E" not in data.conditions.index
    np.testing.assert_allclose(data.mean("A"), lognorm[labels == "A"].mean(0), rtol=1e-5)
    np.testing.assert_allclose(data.ctrl_mean("A+B"), lognorm[labels == "ctrl"].mean(0),
                               rtol=1e-5)
    np.testing.assert_allclose(data.delta("C"),
                               lognorm[labels == "C+ctrl"].mean(0) - lognorm[labels == "ctrl"].mean(0),
                               rtol=1e-4, atol=1e-6)
    assert data.conditions.at["A+B", "n_cells"] == 25
    assert data.perturbation("-D").signs == (-1,)
    assert data.genes[0] == "ENSG00000" and data.symbols[0] == "G0"


def test_top_de_genes_match_scanpy_rank_genes_groups(store):
    src, x = store
    data = load_perturbation_data(src, PerturbationConfig(n_de_genes=10))
    lognorm = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    adata = ad.AnnData(lognorm, obs=pd.DataFrame({"g": LABELS}, index=map(str, range(len(x)))))
    sc.tl.rank_genes_groups(adata, "g", groups=["A", "B+A"], reference="ctrl",
                            method="t-test", rankby_abs=True, n_genes=10)
    names = adata.uns["rank_genes_groups"]["names"]
    for ours, theirs in [("A", "A"), ("A+B", "B+A")]:
        expected = [int(i) for i in names[theirs]]
        assert data.de_idx[ours].tolist() == expected


def test_non_dropout_de_genes_follow_gears(store):
    """GEARS' top_non_dropout_de_20: the DE ranking restricted to genes with a nonzero mean in
    the condition, or a zero mean in both condition and control."""
    src, _ = store
    full = load_perturbation_data(src, PerturbationConfig(n_de_genes=30))
    data = load_perturbation_data(src, PerturbationConfig(n_de_genes=5))
    for cond in data.perturbed:
        mean, ctrl = data.mean(cond), data.ctrl_mean(cond)
        keep = [g for g in full.de_idx[cond] if mean[g] != 0 or ctrl[g] == 0][:5]
        assert data.de_nd_idx[cond].tolist() == keep
    # the store has dropout genes, so the restriction changes some lists
    assert any(not np.array_equal(data.de_idx[c], data.de_nd_idx[c]) for c in data.perturbed)


def test_filter_covariate_and_sign_columns(tmp_path):
    x = _counts()[:118]
    obs = pd.DataFrame({"perturbation": LABELS[:118],
                        "dataset": ["keep", "drop"] * 59,
                        "kind": ["CRISPRi", "CRISPRa"] * 59,
                        "cell_type": ["t1", "t2"] * 59}, index=[f"c{i}" for i in range(118)])
    var = pd.DataFrame({"gene_symbol": [f"G{i}" for i in range(30)]}, index=[f"G{i}" for i in range(30)])
    uri = str(tmp_path / "f.zarr")
    with StoreWriter(uri, var=var, raw_counts=False) as w:
        w.append(sp.csr_matrix(x), obs)
    src = open_store(uri)
    cfg = PerturbationConfig(filter_column="dataset", filter_values=["keep"],
                             sign_column="kind", sign_values={"CRISPRi": -1})
    data = load_perturbation_data(src, cfg)
    assert int(data.conditions["n_cells"].sum()) == 58 and data.dropped == {"D": 1}  # "-D" under CRISPRi: -(-1)
    assert data.perturbation("-A").signs == (-1,)
    keep = (np.arange(118) % 2 == 0) & (np.array(LABELS[:118]) == "ctrl")
    np.testing.assert_allclose(data.ctrl_mean("-A"), x[keep].mean(0), rtol=1e-5)  # not normalised

    by_type = load_perturbation_data(src, PerturbationConfig(covariate_column="cell_type"))
    assert "t1/A" in by_type.perturbed and by_type.control_of("t2/A") == "t2/ctrl"

    with pytest.raises(ValueError, match="no obs column 'condition'"):
        load_perturbation_data(src, PerturbationConfig(perturbation_column="condition"))
    with pytest.raises(ValueError, match=r"no cell has dataset in \['other'\]"):
        load_perturbation_data(src, PerturbationConfig(filter_column="dataset",
                                                       filter_values=["other"]))
    with pytest.raises(ValueError, match=r"\['CRISPRi'\] have no entry"):
        load_perturbation_data(src, PerturbationConfig(sign_column="kind",
                                                       sign_values={"CRISPRa": 1}))
    with pytest.raises(ValueError, match="'ctrl' is reserved"):
        load_perturbation_data(src, PerturbationConfig(control_labels=["NT"]))
    # a covariate value without control cells has no delta to compute
    with pytest.raises(ValueError, match=r"no control cells .* for perturbation value\(s\) \['-D', 'A'"):
        load_perturbation_data(src, PerturbationConfig(covariate_column="perturbation"))


def test_missing_labels_are_refused_naming_a_cell(tmp_path):
    """A missing perturbation (or covariate) label is an error, never the gene "nan"."""
    x = _counts()[:20]
    obs = pd.DataFrame({"perturbation": pd.Categorical(["ctrl"] * 10 + ["A"] * 6 + [np.nan] * 4),
                        "cell_type": [None] + ["t1"] * 19}, index=[f"c{i}" for i in range(20)])
    var = pd.DataFrame({"gene_symbol": [f"G{i}" for i in range(30)]}, index=[f"G{i}" for i in range(30)])
    with StoreWriter(tmp_path / "s", var=var, raw_counts=False) as w:
        w.append(sp.csr_matrix(x), obs)
    src = open_store(tmp_path / "s")
    with pytest.raises(ValueError, match=r"4 cell\(s\) have no perturbation label .*'c16'"):
        load_perturbation_data(src, PerturbationConfig())
    fixed = PerturbationConfig(filter_column="perturbation", filter_values=["ctrl", "A"],
                               covariate_column="cell_type")
    with pytest.raises(ValueError, match=r"1 cell\(s\) have no cell_type label .*'c0'"):
        load_perturbation_data(src, fixed)
    ok = load_perturbation_data(src, PerturbationConfig(filter_column="perturbation",
                                                        filter_values=["ctrl", "A"]))
    assert sorted(ok.perturbations) == ["A", "ctrl"]


def test_config_validation():
    with pytest.raises(ConfigError, match="together"):
        PerturbationConfig(filter_column="dataset")
    with pytest.raises(ConfigError, match="sign_values.x"):
        PerturbationConfig(sign_column="k", sign_values={"x": 2})
    with pytest.raises(ConfigError, match="min_cells"):
        PerturbationConfig(min_cells=1)


def test_declared_treatments_are_not_genes():
    """Kang 2018's stimulus: 'stim' is a treatment, kept apart from genes; a combination of a
    gene and a treatment keeps both; an undeclared 'stim' would be read as a gene."""
    from pertscale.data.perturbation import PerturbationConfig, parse_perturbation

    stim = parse_perturbation("stim", control_labels=["ctrl"], treatments=["stim"])
    assert stim.genes == () and stim.treatments == ("stim",) and not stim.is_control
    assert stim.name == "stim" and stim.parts == (("stim", 1),)
    both = parse_perturbation("stim+-TP53", control_labels=["ctrl"], treatments=["stim"])
    assert both.genes == ("TP53",) and both.signs == (-1,) and both.is_combo
    assert both.name == "-TP53+stim"
    assert parse_perturbation("stim", control_labels=["ctrl"]).genes == ("stim",)
    with pytest.raises(ConfigError, match=r"treatments \['ctrl'\] are also control_labels"):
        PerturbationConfig(control_labels=["ctrl"], treatments=["ctrl"])
