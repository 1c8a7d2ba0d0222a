"""The Perturb-seq simulator: counts, labels, ground truth, determinism, files, and the learning
signal that the GenePert, masked-value and GEARS tests downstream rely on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tracemalloc
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.linear_model import Ridge, RidgeCV

from pertscale.config import ConfigError, load_config
from pertscale.data.synthetic import (
    CONTROL,
    SimulatorConfig,
    build_ground_truth,
    load_truth,
    simulate,
    simulate_blocks,
    write_dataset,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"n_genes": 400, "n_cells": 8000, "n_programs": 10, "n_single_perturbations": 80,
             "n_double_perturbations": 20}


@pytest.fixture(scope="module")
def data():
    return simulate(SimulatorConfig(**SMALL, seed=0))


@pytest.fixture(scope="module")
def lognorm(data):
    """log1p(counts / library * 1e4), dense [cells, genes]."""
    x = data.adata.X.toarray()
    return np.log1p(x / x.sum(1, keepdims=True) * 1e4)


def _labels(data) -> np.ndarray:
    return data.adata.obs["perturbation"].astype(str).to_numpy()


# --- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("n_genes", 5), ("control_fraction", 0.0), ("control_fraction", 1.0),
    ("activation_fraction", 1.5), ("dispersion_median", 0.0), ("hop_decay", -0.1),
    ("embedding_dim", 0), ("response", "cascade"), ("cell_type_gene_sd", -1.0)])
def test_config_rejects_out_of_range_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SimulatorConfig(**{field: value})


def test_config_rejects_impossible_designs():
    with pytest.raises(ConfigError, match="regulator genes"):
        SimulatorConfig(n_genes=100, n_single_perturbations=50)
    with pytest.raises(ConfigError, match="same-sign pairs"):
        SimulatorConfig(n_single_perturbations=4, n_double_perturbations=3)
    with pytest.raises(ConfigError, match="every perturbation needs at least one cell"):
        SimulatorConfig(n_cells=100)
    with pytest.raises(ConfigError, match="valid keys"):
        SimulatorConfig.from_dict({"n_gene": 10})


def test_config_file_holds_the_defaults():
    cfg = load_config(ROOT / "configs" / "simulate.toml", job="simulate")
    assert cfg == SimulatorConfig()


# --- counts and labels ----------------------------------------------------------------------
def test_counts_are_sparse_overdispersed_integers_with_varying_library_sizes(data):
    x = data.adata.X
    assert sp.isspmatrix_csr(x) and x.dtype == np.float32
    assert np.all(x.data > 0) and np.all(x.data == np.round(x.data))
    nonzero = np.diff(x.indptr) / x.shape[1]
    assert 0.05 < nonzero.mean() < 0.4
    lib = np.asarray(x.sum(1)).ravel()
    np.testing.assert_array_equal(lib, data.adata.obs["n_counts"].to_numpy())
    assert lib.std() / lib.mean() > 0.3
    ctrl = x[_labels(data) == CONTROL].toarray()
    mean, var = ctrl.mean(0), ctrl.var(0)
    expressed = mean > 2
    assert np.median(var[expressed] / mean[expressed]) > 1.5  # NB, not Poisson


def test_obs_labels_follow_the_documented_formats(data):
    obs, truth = data.adata.obs, data.truth
    assert data.adata.var.index[0] == "ENSGSIM00000001"
    assert data.adata.var["gene_symbol"].iloc[0] == "G0001"
    names = set(obs["perturbation"].cat.categories)
    assert CONTROL in names and len(names) == 1 + 80 + 20
    doubles = [n for n in names if "+" in n]
    assert len(doubles) == 20 and all(n.split("+") == sorted(n.split("+")) for n in doubles)
    for name, cond, kind, sign in obs[["perturbation", "condition", "perturbation_type", "sign"]
                                      ].drop_duplicates().itertuples(index=False):
        expected = {0: "control", 1: "activation", -1: "inhibition"}[sign]
        assert kind == expected, name
        if name == CONTROL:
            assert cond == CONTROL
        elif "+" not in name:
            assert cond == f"{name}+ctrl"
        else:
            assert cond == name
    assert abs((obs["perturbation"] == CONTROL).mean() - 0.1) < 0.01
    assert set(obs["cell_type"].cat.categories) == set(truth.cell_types)
    assert obs["batch"].nunique() == 2
    # doubles are made of perturbed singles of the same sign
    for n in doubles:
        signs = {truth.condition_sign[truth.condition_index(g)] for g in n.split("+")}
        assert signs == {truth.condition_sign[truth.condition_index(n)]}


# --- ground truth ---------------------------------------------------------------------------
def test_truth_ctrl_mean_matches_the_control_cells(data):
    obs, truth = data.adata.obs, data.truth
    x = data.adata.X
    for t, cell_type in enumerate(truth.cell_types):
        rows = ((obs["perturbation"] == CONTROL) & (obs["cell_type"] == cell_type)).to_numpy()
        emp = np.asarray(x[rows].mean(0)).ravel()
        ok = truth.ctrl_mean[t] > 5
        rel = np.abs(emp[ok] / truth.ctrl_mean[t][ok] - 1)
        assert np.median(rel) < 0.1, cell_type
        np.testing.assert_array_equal(truth.mean(CONTROL, cell_type), truth.ctrl_mean[t])
    with pytest.raises(ValueError, match="unknown perturbation 'NOPE'"):
        truth.mean("NOPE", truth.cell_types[0])


def test_perturbations_move_the_target_and_its_regulatory_neighbourhood(data):
    truth, x, labels = data.truth, data.adata.X, _labels(data)
    ctrl = np.asarray(x[labels == CONTROL].mean(0)).ravel()
    lfc_on_target = []
    for c, genes in enumerate(truth.condition_genes):
        if len(genes) != 1:
            continue
        g = genes[0]
        m = np.asarray(x[labels == truth.conditions[c], g].mean()).item()
        lfc_on_target.append(truth.condition_sign[c] * (np.log(m + 0.1) - np.log(ctrl[g] + 0.1)))
    assert np.mean(np.array(lfc_on_target) > 0) > 0.9
    # the truth moves only genes reachable from the target (plus the generic program-0 response)
    adj = (truth.graph() != 0).astype(np.int32)
    reach = sp.identity(truth.num_genes, dtype=np.int32, format="csr")
    hop = reach
    for _ in range(data.config.n_hops):
        hop = hop @ adj
        reach = reach + hop
    for c, genes in enumerate(truth.condition_genes):
        if len(genes) == 1:
            moved = np.abs(truth.lfc[c]).max(0) > 1e-6
            allowed = (reach[genes[0]].toarray().ravel() > 0) | (truth.program == 0)
            assert not np.any(moved & ~allowed), truth.conditions[c]


def test_graph_is_a_sparse_dag():
    truth = build_ground_truth(SimulatorConfig(**SMALL))
    adj = (truth.graph() != 0).astype(np.float64)
    assert adj.nnz < 10 * truth.num_genes
    power = adj.copy()
    for _ in range(truth.num_genes):
        if power.nnz == 0:
            break
        power = power @ adj
    assert power.nnz == 0  # nilpotent: no cycles


def test_doubles_are_additive_except_for_interacting_pairs(data):
    truth, cfg = data.truth, data.config
    common = cfg.common_response * truth.loading * (truth.program == 0)
    kinds = set()
    for c, genes in enumerate(truth.condition_genes):
        if len(genes) != 2:
            continue
        a, b = (truth.condition_index(truth.gene_symbols[g]) for g in genes)
        raw = lambda i: np.arctanh(truth.lfc[i] / cfg.max_lfc) * cfg.max_lfc
        additive = raw(a) + raw(b) - common
        gap = np.abs(raw(c) - additive).max()
        kinds.add(truth.interaction[c])
        if truth.interaction[c] == "additive":
            assert gap < 1e-3, truth.conditions[c]
        else:
            assert gap > 0.05, truth.conditions[c]
    assert "additive" in kinds and len(kinds) >= 2


def test_cell_types_differ_in_baseline_and_partly_in_response(data):
    truth = data.truth
    assert np.abs(truth.base_log[0] - truth.base_log[1]).mean() > 0.2
    singles = [c for c, g in enumerate(truth.condition_genes) if len(g) == 1]
    a, b = truth.lfc[singles, 0].ravel(), truth.lfc[singles, 1].ravel()
    assert 0.5 < np.corrcoef(a, b)[0, 1] < 0.999


def test_program_responses_shift_whole_programs_alike_in_every_cell_type():
    """response = "programs": a single moves its own program by sign x program_shift and the
    programs its edges reach by sign x hop_decay x program_shift, the same in every type;
    cell_type_gene_sd sets how far the types' gene baselines differ."""
    cfg = SimulatorConfig(**SMALL, response="programs", cell_type_gene_sd=2.0, seed=0)
    truth = build_ground_truth(cfg)
    assert all(np.array_equal(truth.lfc[:, 0], truth.lfc[:, t]) for t in (1, 2))
    common = cfg.common_response * (truth.program == 0)
    checked = 0
    for c, genes in enumerate(truth.condition_genes):
        if len(genes) != 1:
            continue
        g, sign = genes[0], int(truth.condition_sign[c])
        raw = np.arctanh(truth.lfc[c, 0] / cfg.max_lfc) * cfg.max_lfc
        shift = np.where(truth.loading > 0, raw / np.maximum(truth.loading, 1e-9), 0.0) - common
        others = np.arange(cfg.n_genes) != g
        for k in range(cfg.n_programs):
            members = (truth.program == k) & others
            assert np.ptp(shift[members]) < 1e-3, (truth.conditions[c], k)
            level = shift[members][0]
            if k == truth.program[g]:
                assert level == pytest.approx(sign * cfg.program_shift, abs=1e-3)
            else:
                assert min(abs(level), abs(abs(level) - cfg.hop_decay * cfg.program_shift)) < 1e-3
        assert np.all(raw[truth.program < 0] == 0)  # background genes do not respond
        checked += 1
    assert checked == cfg.n_single_perturbations
    spread = lambda t: (t.base_log - t.base_log.mean(0)).std()
    assert spread(truth) > 3 * spread(build_ground_truth(cfg.replace(cell_type_gene_sd=0.2)))


def test_empirical_fold_changes_follow_the_truth(data):
    truth, x, labels = data.truth, data.adata.X, _labels(data)
    ctrl = np.asarray(x[labels == CONTROL].mean(0)).ravel()
    emp, true = [], []
    for c, genes in enumerate(truth.condition_genes):
        if genes:
            m = np.asarray(x[labels == truth.conditions[c]].mean(0)).ravel()
            ok = ctrl > 2
            emp.append(np.log(m[ok] + 0.1) - np.log(ctrl[ok] + 0.1))
            true.append(truth.lfc[c].mean(0)[ok])
    assert np.corrcoef(np.concatenate(emp), np.concatenate(true))[0, 1] > 0.8


# --- determinism and streaming --------------------------------------------------------------
def test_blocks_do_not_depend_on_block_size_or_threads_and_seeds_differ():
    cfg = SimulatorConfig(**{**SMALL, "n_cells": 5000})
    a = list(simulate_blocks(cfg, 1000))
    b = list(simulate_blocks(cfg, 4096, num_threads=2))
    assert [x.shape[0] for x, _ in a] == [1000] * 5
    xa, xb = sp.vstack([x for x, _ in a]), sp.vstack([x for x, _ in b])
    assert (xa != xb).nnz == 0
    pd.testing.assert_frame_equal(pd.concat([o for _, o in a]), pd.concat([o for _, o in b]))
    other = sp.vstack([x for x, _ in simulate_blocks(cfg.replace(seed=1), 4096)])
    assert (xa != other).nnz > 0.5 * xa.nnz
    with pytest.raises(ValueError, match="block_size"):
        next(simulate_blocks(cfg, 0))


def test_streaming_memory_does_not_grow_with_the_number_of_cells():
    def peak(n_cells):
        cfg = SimulatorConfig(**{**SMALL, "n_single_perturbations": 40,
                                 "n_double_perturbations": 10, "n_genes": 200,
                                 "n_cells": n_cells})
        tracemalloc.start()
        for _ in simulate_blocks(cfg, 1024):
            pass
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top
    small, large = peak(4000), peak(16000)
    assert large < 1.5 * small


def test_write_dataset_files_are_complete_readable_and_deterministic(tmp_path):
    cfg = SimulatorConfig(**{**SMALL, "n_cells": 2000})
    first = write_dataset(cfg, tmp_path / "a")
    second = write_dataset(cfg, tmp_path / "b")
    assert first["files"] == second["files"]  # byte-identical files for the same seed
    out = tmp_path / "a"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cells.h5ad", "go_annotations.tsv", "go_terms.tsv", "go_dag_edges.tsv",
         "gene_sets.gmt", "gene_embeddings.npz", "truth.npz", "manifest.json"])
    manifest = json.loads((out / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert manifest["config"] == cfg.to_dict() and manifest["n_cells"] == 2000

    mem = simulate(cfg)
    cells = ad.read_h5ad(out / "cells.h5ad")
    assert sp.isspmatrix_csr(cells.X) and (cells.X != mem.adata.X).nnz == 0
    pd.testing.assert_frame_equal(cells.obs, mem.adata.obs)
    ann = pd.read_csv(out / "go_annotations.tsv", sep="\t")
    assert list(ann.columns) == ["gene_symbol", "go_id", "evidence", "ontology"]
    assert set(ann["go_id"]) <= set(pd.read_csv(out / "go_terms.tsv", sep="\t")["go_id"])
    for line in (out / "gene_sets.gmt").read_text().splitlines():
        go_id, name, *genes = line.split("\t")
        assert go_id.startswith("GO:9") and name and 5 <= len(genes) <= 500
    with np.load(out / "gene_embeddings.npz") as z:
        assert z["emb"].dtype == np.float32 and z["emb"].shape == (400, cfg.embedding_dim)
        assert list(z["genes"]) == list(cells.var["gene_symbol"])
    truth = load_truth(out / "truth.npz")
    for field in dataclasses.fields(truth):
        got, want = getattr(truth, field.name), getattr(mem.truth, field.name)
        if isinstance(want, list):
            assert got == want, field.name
        else:
            assert got.dtype == want.dtype and np.array_equal(got, want), field.name

    with pytest.raises(FileExistsError, match="holds a simulated dataset.*--overwrite"):
        write_dataset(cfg, out)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    (out / "notes.txt").write_text("mine")  # a user's file beside ours: never replaced
    with pytest.raises(FileExistsError, match="not written by pertscale simulate"):
        write_dataset(cfg, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").is_file()


# --- learning signal for downstream models --------------------------------------------------
def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def test_gene_embeddings_predict_unseen_single_perturbations(data, lognorm):
    """GenePert-style ridge (signed, L2-normalised embeddings -> pseudo-bulk delta) beats the
    train-mean baseline on held-out perturbations (5-fold over perturbations)."""
    truth, labels = data.truth, _labels(data)
    singles = [c for c, g in enumerate(truth.condition_genes) if len(g) == 1]
    ctrl = lognorm[labels == CONTROL].mean(0)
    delta = np.stack([lognorm[labels == truth.conditions[c]].mean(0) - ctrl for c in singles])
    emb = data.embeddings[[truth.condition_genes[c][0] for c in singles]]
    feats = emb / np.linalg.norm(emb, axis=1, keepdims=True) * truth.condition_sign[singles, None]
    order = np.random.default_rng(0).permutation(len(singles))
    ridge, mean = [], []
    for test in np.array_split(order, 5):
        train = np.setdiff1d(order, test)
        model = RidgeCV(alphas=np.logspace(-2, 3, 11)).fit(feats[train], delta[train])
        ridge.append(_pearson_rows(model.predict(feats[test]), delta[test]))
        mean.append(_pearson_rows(np.broadcast_to(delta[train].mean(0), delta[test].shape),
                                  delta[test]))
    assert np.concatenate(ridge).mean() > np.concatenate(mean).mean() + 0.03


def test_cells_have_co_expression_beyond_gene_means(data, lognorm):
    """Held-out cells: the values of 50 variable genes are predicted from the other genes better
    than by their per-gene means (what a masked-value model must exploit)."""
    half = len(lognorm) // 2
    target = np.argsort(-lognorm.var(0))[:50]
    rest = np.setdiff1d(np.arange(lognorm.shape[1]), target)
    model = Ridge(alpha=10.0).fit(lognorm[:half, rest], lognorm[:half, target])
    mse_model = ((model.predict(lognorm[half:, rest]) - lognorm[half:, target]) ** 2).mean()
    mse_mean = ((lognorm[:half, target].mean(0) - lognorm[half:, target]) ** 2).mean()
    assert mse_model < 0.9 * mse_mean


def test_genes_of_one_program_share_go_terms(data):
    truth, terms = data.truth, data.go.term_sets()
    genes = np.flatnonzero(truth.program >= 0)
    same, other = [], []
    for i in genes:
        for j in genes[genes > i]:
            shared = bool(terms.get(truth.gene_symbols[i], set())
                          & terms.get(truth.gene_symbols[j], set()))
            (same if truth.program[i] == truth.program[j] else other).append(shared)
    assert np.mean(same) > 0.5 > np.mean(other) + 0.2
