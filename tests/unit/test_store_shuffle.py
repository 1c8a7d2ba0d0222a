"""The two-pass bucket shuffle: every cell once with its obs row, in a seeded order, whatever
the number of buckets and of appends per bucket; its scratch folder never outlives it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertscale.store import shuffle as shuffle_module
from pertscale.store.shuffle import BucketShuffle


def source(n=1000, g=30, seed=0):
    rng = np.random.default_rng(seed)
    x = sp.random(n, g, density=0.2, format="csr", random_state=seed,
                  data_rvs=lambda k: rng.integers(1, 50, k)).astype(np.float32)
    obs = pd.DataFrame({"label": pd.Categorical(np.arange(n) * 10 // n),
                        "row": np.arange(n)}, index=[f"c{i}" for i in range(n)])
    return x, obs


def run(tmp_path, x, obs, *, seed, bucket_values, block=97):
    with BucketShuffle(tmp_path / "scratch", n_cells=x.shape[0], values=x.nnz, seed=seed,
                       bucket_values=bucket_values) as s:
        for a in range(0, x.shape[0], block):
            s.add(x[a:a + block], obs.iloc[a:a + block])
        parts = list(s.blocks(64))
    return sp.vstack([p for p, _ in parts]).tocsr(), pd.concat([o for _, o in parts])


@pytest.mark.parametrize("bucket_values", [10**9, 500, 30])
def test_every_cell_once_with_its_obs_row(tmp_path, monkeypatch, bucket_values):
    # a tiny pass-1 buffer: every bucket gets many appends (frames) before it is read back
    monkeypatch.setattr(shuffle_module, "MIN_BUFFER_VALUES", 200)
    monkeypatch.setattr(shuffle_module, "BUFFER_VALUES_PER_BUCKET", 1)
    flushes = []
    flush = BucketShuffle._flush
    monkeypatch.setattr(BucketShuffle, "_flush", lambda self: (flushes.append(1), flush(self)))
    x, obs = source()
    out, out_obs = run(tmp_path, x, obs, seed=3, bucket_values=bucket_values)
    rows = out_obs["row"].to_numpy()
    assert sorted(rows) == list(range(1000)) and (rows != np.arange(1000)).any()
    assert (out != x[rows]).nnz == 0
    assert list(out_obs.index) == [f"c{i}" for i in rows]
    assert isinstance(out_obs["label"].dtype, pd.CategoricalDtype)
    assert not (tmp_path / "scratch").exists()
    assert len(flushes) > 5


def test_order_depends_on_the_seed_only(tmp_path):
    x, obs = source(300)
    a = run(tmp_path, x, obs, seed=1, bucket_values=200)[1]["row"].to_numpy()
    b = run(tmp_path, x, obs, seed=1, bucket_values=200)[1]["row"].to_numpy()
    c = run(tmp_path, x, obs, seed=2, bucket_values=200)[1]["row"].to_numpy()
    assert (a == b).all() and (a != c).any()


def test_scratch_is_removed_after_a_failure(tmp_path):
    x, obs = source(100)
    with pytest.raises(RuntimeError, match="50 cells were added, 100 announced"), \
            BucketShuffle(tmp_path / "scratch", n_cells=100, values=x.nnz, seed=0) as s:
        s.add(x[:50], obs.iloc[:50])
        next(s.blocks(10))
    assert not (tmp_path / "scratch").exists()
