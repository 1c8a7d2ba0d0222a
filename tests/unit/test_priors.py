"""GEARS priors: co-expression and GO graphs against dense references, missing GO terms, the
content-hash cache and the array round trip."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertscale.config import ConfigError
from pertscale.data.priors import (
    GearsPriors,
    PriorsConfig,
    build_gears_priors,
    coexpression_graph,
    go_graph,
    read_go_terms,
)
from pertscale.store import StoreWriter, open_store

N_CELLS, N_GENES = 150, 12


def _values(raw: bool, seed=0) -> np.ndarray:
    """Cells x genes sharing two latent factors (so some genes correlate), one constant gene."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(N_CELLS, 2))
    load = rng.normal(size=(2, N_GENES))
    if raw:
        x = rng.poisson(np.exp(1.0 + 0.6 * z @ load)).astype(np.float32)
        x[:, 3] = 0  # never expressed: constant after normalising
        x[:, -1] += 1  # no cell without counts
    else:
        x = np.exp(0.5 * z @ load + 0.3 * rng.normal(size=(N_CELLS, N_GENES))).astype(np.float32)
        x[:, 3] = 2.5  # constant, nonzero
    return x


def _write_store(path, x: np.ndarray, raw: bool):
    var = pd.DataFrame({"gene_symbol": [f"G{i}" for i in range(N_GENES)]},
                       index=[f"ENSG{i:05d}" for i in range(N_GENES)])
    obs = pd.DataFrame({"perturbation": "ctrl"}, index=[f"c{i}" for i in range(len(x))])
    with StoreWriter(str(path), var=var, raw_counts=raw) as w:
        for lo in range(0, len(x), 40):
            w.append(sp.csr_matrix(x[lo:lo + 40]), obs.iloc[lo:lo + 40])
    return open_store(str(path))


class CountingStore:
    """A store that counts (or refuses) its block reads."""

    def __init__(self, src, *, refuse=False):
        self._src, self._refuse, self.reads = src, refuse, []

    def __getattr__(self, name):
        return getattr(self._src, name)

    def read_csr_async(self, start, stop):
        if self._refuse:
            raise AssertionError("the store was read")
        self.reads.append((start, stop))
        return self._src.read_csr_async(start, stop)


def _reference_edges(score: np.ndarray, top_k: int, threshold: float) -> set:
    """Edges (j, i) by a plain per-row loop: top_k by score then index, self excluded."""
    edges = {}
    for i in range(score.shape[0]):
        order = sorted((j for j in range(score.shape[1]) if j != i),
                       key=lambda j: (-score[i, j], j))
        for j in order[:top_k]:
            if score[i, j] > threshold:
                edges[(j, i)] = score[i, j]
    return edges


def _edges(graph) -> dict:
    return {(int(j), int(i)): float(w) for (j, i), w in zip(graph.edge_index.T, graph.edge_weight)}


@pytest.mark.parametrize("raw", [True, False])
def test_coexpression_equals_dense_pearson(tmp_path, raw):
    x = _values(raw)
    src = CountingStore(_write_store(tmp_path / "s.zarr", x, raw))
    mask = np.zeros(N_CELLS, dtype=bool)
    mask[5:60] = True
    mask[130:140] = True  # blocks of 16 rows: 64-127 hold no selected row
    graph = coexpression_graph(src, mask, top_k=3, threshold=0.2, block_cells=16)

    values = np.log1p(x / x.sum(1, keepdims=True) * 1e4) if raw else x.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.abs(np.corrcoef(values[mask], rowvar=False))
    r[np.isnan(r)] = 0
    ref = _reference_edges(r, 3, 0.2)
    ours = _edges(graph)
    assert graph.nodes == [f"ENSG{i:05d}" for i in range(N_GENES)]
    assert graph.edge_index.dtype == np.int64 and graph.edge_weight.dtype == np.float32
    assert set(ours) == set(ref) and 0 < len(ours) < 3 * N_GENES
    np.testing.assert_allclose([ours[e] for e in ref], list(ref.values()), atol=1e-6)
    assert not any(3 in e for e in ours)  # the constant gene correlates with nothing
    assert all(start < 64 or start >= 128 for start, _ in src.reads)


def test_coexpression_needs_two_cells(tmp_path):
    src = _write_store(tmp_path / "s.zarr", _values(True), True)
    mask = np.zeros(N_CELLS, dtype=bool)
    mask[7] = True
    with pytest.raises(ValueError, match="at least 2 selected cells"):
        coexpression_graph(src, mask, top_k=3, threshold=0.2)
    with pytest.raises(ValueError, match="bool array"):
        coexpression_graph(src, np.ones(N_CELLS), top_k=3, threshold=0.2)


TERMS = {"A": {"t1", "t2", "t3"}, "B": {"t1", "t2"}, "C": {"t3", "t4"}, "D": {"t5"},
         "E": {"t1", "t2", "t3", "t4"}, "NOT_PERTURBED": {"t1"}}


def test_go_graph_hand_computed_jaccard():
    graph = go_graph(list("ABCDE"), TERMS, top_k=2, threshold=0.3)
    a, b, c, _, e = range(5)
    # Jaccard: AB 2/3, AC 1/4, AE 3/4, BE 2/4, CE 2/4, others 0. E's third neighbour C ties
    # with B at 0.5 and loses on index; C's second neighbour A (0.25) is under the threshold.
    assert _edges(graph) == pytest.approx({
        (e, a): 0.75, (b, a): 2 / 3, (a, b): 2 / 3, (e, b): 0.5, (e, c): 0.5,
        (a, e): 0.75, (b, e): 0.5})
    assert graph.nodes == list("ABCDE")
    loose = _edges(go_graph(list("ABCDE"), TERMS, top_k=10, threshold=0.0))
    assert len(loose) == 2 * 5 and loose[(a, c)] == pytest.approx(0.25)


def _go_table(path, rows):
    pd.DataFrame(rows, columns=["gene_symbol", "go_id", "evidence", "ontology"]).to_csv(
        path, sep="\t", index=False)
    return str(path)


@pytest.fixture
def setup(tmp_path):
    src = _write_store(tmp_path / "s.zarr", _values(True), True)
    go_path = _go_table(tmp_path / "go.tsv", [
        (g, t, "IDA", "CC" if t == "t5" else "BP") for g, ts in TERMS.items() for t in sorted(ts)])
    cfg = PriorsConfig(go_path=go_path, coexpress_top_k=3, coexpress_threshold=0.2,
                       go_top_k=2, go_threshold=0.3, cache_dir=str(tmp_path / "cache"),
                       block_cells=32)
    mask = np.arange(N_CELLS) % 3 != 0
    return src, cfg, mask


def test_missing_go_terms(setup):
    src, cfg, mask = setup
    genes = ["A", "B", "ZZZ", "E"]
    with pytest.raises(ValueError, match=r"ZZZ.*allow_missing_go"):
        build_gears_priors(src, cfg, rows_mask=mask, pert_genes=genes)
    # D's only term is CC: without CC it has none
    with pytest.raises(ValueError, match=r"\['D'\]"):
        build_gears_priors(src, cfg.replace(go_ontologies=["BP", "MF"]), rows_mask=mask,
                           pert_genes=list("ABCDE"))
    priors = build_gears_priors(src, cfg.replace(allow_missing_go=True), rows_mask=mask,
                                pert_genes=genes)
    assert priors.no_go_terms == ["ZZZ"] and priors.go.nodes == genes
    assert 2 not in priors.go.edge_index and priors.go.num_edges > 0


def test_cache_hit_and_miss(setup, caplog):
    src, cfg, mask = setup
    caplog.set_level(logging.INFO, logger="pertscale.data.priors")
    genes = list("ABCDE")
    first = build_gears_priors(src, cfg, rows_mask=mask, pert_genes=genes)
    assert not first.cached
    assert [p.name for p in Path(cfg.cache_dir).iterdir()] == [f"{first.sha256}.npz"]
    again = build_gears_priors(CountingStore(src, refuse=True), cfg.replace(block_cells=7),
                               rows_mask=mask.copy(), pert_genes=genes)
    assert again.cached and again.sha256 == first.sha256
    assert _edges(again.coexpress) == _edges(first.coexpress)
    assert _edges(again.go) == _edges(first.go)
    assert "from cache" in caplog.text

    for changed_cfg, changed_mask in [(cfg.replace(coexpress_threshold=0.3), mask),
                                      (cfg, mask & (np.arange(N_CELLS) < 100))]:
        counting = CountingStore(src)
        miss = build_gears_priors(counting, changed_cfg, rows_mask=changed_mask,
                                  pert_genes=genes)
        assert not miss.cached and miss.sha256 != first.sha256 and counting.reads


def test_arrays_round_trip(setup):
    src, cfg, mask = setup
    priors = build_gears_priors(src, cfg.replace(allow_missing_go=True), rows_mask=mask,
                                pert_genes=["E", "A", "ZZZ"])
    arrays = priors.to_arrays()
    assert all(a.dtype != object for a in arrays.values())
    back = GearsPriors.from_arrays(arrays)
    assert back.sha256 == priors.sha256 and back.no_go_terms == ["ZZZ"]
    for name in ("coexpress", "go"):
        ours, theirs = getattr(back, name), getattr(priors, name)
        assert ours.nodes == theirs.nodes
        np.testing.assert_array_equal(ours.edge_index, theirs.edge_index)
        np.testing.assert_array_equal(ours.edge_weight, theirs.edge_weight)
    with pytest.raises(ValueError, match="go_edge_index"):
        GearsPriors.from_arrays({k: v for k, v in arrays.items() if k != "go_edge_index"})


@pytest.mark.parametrize("field, value", [
    ("coexpress_threshold", float("nan")), ("go_threshold", float("nan")),
    ("go_threshold", 1.5), ("coexpress_threshold", -0.1), ("coexpress_top_k", 0),
    ("go_top_k", -1), ("target_sum", float("inf")), ("target_sum", 0.0), ("block_cells", 0),
    ("go_ontologies", ["BP", "XX"]), ("go_ontologies", []),
])
def test_config_refuses_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        PriorsConfig(**{field: value})


def test_go_path_required_and_checked(setup, tmp_path):
    src, cfg, mask = setup
    with pytest.raises(ValueError, match="go_path"):
        build_gears_priors(src, cfg.replace(go_path=""), rows_mask=mask, pert_genes=["A"])
    bad = tmp_path / "bad.tsv"
    pd.DataFrame({"gene": ["A"], "term": ["t1"]}).to_csv(bad, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"bad.tsv.*\['gene', 'term'\]"):
        read_go_terms(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        read_go_terms(str(tmp_path / "absent.tsv"))


def test_read_go_terms_real_table(shared_data):
    path = shared_data / "go" / "human_gene2go_direct.tsv.gz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    terms = read_go_terms(str(path))
    assert "GO:0006355" in terms["KLF1"] and len(terms) > 10000
    mf = read_go_terms(str(path), ontologies=("MF",))
    assert mf["KLF1"] and mf["KLF1"] < terms["KLF1"] and "GO:0006355" not in mf["KLF1"]
