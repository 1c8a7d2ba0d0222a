"""Batch randomness against the source order, and the shuffled ingest that provides it."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertscale.constants import CELL_INDEX
from pertscale.data.loader import CellLoader, LoaderConfig
from pertscale.data.mixing import batch_mixing, expected_distinct
from pertscale.store import open_store
from pertscale.store.ingest import IngestConfig, ingest
from pertscale.store.shuffle import source_positions


def test_expected_distinct_by_hand_and_by_sampling():
    # N = 4 cells, two labels of 2, batches of 2: P(one label) = 2 / C(4, 2) -> E = 10/6
    assert expected_distinct(np.array([2, 2]), 2) == pytest.approx(10 / 6)
    assert expected_distinct(np.array([5]), 3) == pytest.approx(1.0)
    assert expected_distinct(np.array([1, 1, 1]), 3) == pytest.approx(3.0)
    counts = np.array([50, 30, 10, 5, 3, 1, 1])
    population = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(0)
    sampled = np.mean([len(np.unique(rng.choice(population, 12, replace=False)))
                       for _ in range(20000)])
    assert expected_distinct(counts, 12) == pytest.approx(sampled, abs=0.03)
    with pytest.raises(ValueError, match=r"batch_size=200 must be in \[1, 100\]"):
        expected_distinct(counts, 200)


def test_batch_mixing_counts_source_blocks_and_labels():
    labels = np.repeat(["a", "b", "c", "d"], 4)  # source positions 0..15, sorted by label
    batches = [np.array([0, 1, 2, 3]), np.array([0, 4, 8, 12]), np.array([5, 6])]
    out = batch_mixing(batches, block_size=4, labels=labels)
    assert out["batches"] == 2  # the short last batch is left out
    assert out["source_blocks_per_batch"] == pytest.approx((1 + 4) / 2)
    assert out["labels_per_batch"] == pytest.approx((1 + 4) / 2)
    assert out["labels_expected"] == pytest.approx(expected_distinct(np.full(4, 4), 4))
    assert out["labels_ratio"] == pytest.approx(2.5 / out["labels_expected"])


def write_sorted_h5ad(path, n_cells=100_000, num_labels=100, n_genes=20):
    """A Perturb-seq-like file sorted by its perturbation label (n_cells / num_labels each)."""
    rng = np.random.default_rng(0)
    x = sp.random(n_cells, n_genes, density=0.1, format="csr", random_state=1,
                  data_rvs=lambda k: rng.integers(1, 20, k)).astype(np.float32)
    label = np.arange(n_cells) * num_labels // n_cells
    obs = pd.DataFrame({"perturbation": pd.Categorical([f"P{k:03d}" for k in label])},
                       index=[f"cell{i}" for i in range(n_cells)])
    ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)])) \
        .write_h5ad(path)


def label_mixing(uri):
    """Mean distinct labels per batch of the loader's defaults, against a random batch."""
    store = open_store(uri)
    loader = CellLoader(uri, batch_size=LoaderConfig.batch_size)
    labels = np.empty(store.n_cells, object)
    positions = source_positions(store)
    labels[positions] = store.obs["perturbation"].astype(str).to_numpy()
    batches = [positions[b[CELL_INDEX]] for b in loader]
    return batch_mixing(batches, block_size=256, labels=labels)


def test_sorted_file_ingested_with_defaults_gives_random_batches(tmp_path):
    """A 100k-cell file sorted by a 100-value label: with ingest's and the loader's defaults a
    batch holds >= 95% of the labels a uniformly random batch holds; in the file's order (the
    loader shuffles 256-cell blocks) about a third."""
    write_sorted_h5ad(tmp_path / "sorted.h5ad")
    ingest([tmp_path / "sorted.h5ad"], tmp_path / "shuffled", IngestConfig())
    ingest([tmp_path / "sorted.h5ad"], tmp_path / "source", IngestConfig(order="source"))
    shuffled, source = label_mixing(tmp_path / "shuffled"), label_mixing(tmp_path / "source")
    assert shuffled["labels_expected"] == pytest.approx(100.0, abs=0.01)  # 1,000 cells each
    assert shuffled["labels_per_batch"] >= 0.95 * shuffled["labels_expected"]
    assert source["labels_per_batch"] < 0.4 * source["labels_expected"]  # ~33: 32 runs
    assert shuffled["source_blocks_per_batch"] > 3 * source["source_blocks_per_batch"]
