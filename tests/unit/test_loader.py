"""CellLoader on real (small) tensorstore cell stores: contents, ranks, resume, errors."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertscale.config import ConfigError
from pertscale.constants import CELL_INDEX, INDICES, INDPTR, OBS, VALUES
from pertscale.data.loader import CellLoader, LoaderConfig, build_loader

N_CELLS, N_GENES = 1003, 40
LOADER = {"batch_size": 32, "block_size": 16, "buffer_blocks": 4, "blocks_in_flight": 3,
          "prefetch_batches": 2, "seed": 7}


def make_cells(n_cells: int, n_genes: int, seed: int = 0) -> tuple[sp.csr_matrix, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    x = sp.random(n_cells, n_genes, density=0.2, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 20, k)).astype(np.float32)
    obs = pd.DataFrame({
        "perturbation": pd.Categorical(rng.choice(["ctrl", "KLF1", "CEBPA+SPI1"], n_cells)),
        "dose": rng.random(n_cells),
    }, index=[f"cell{i}" for i in range(n_cells)])
    return x, obs


def write_store(path, x: sp.csr_matrix, obs: pd.DataFrame, block: int = 250,
                first_gene: int = 0) -> str:
    from pertscale.store import StoreWriter

    genes = range(first_gene, first_gene + x.shape[1])
    var = pd.DataFrame({"gene_symbol": [f"G{i}" for i in genes]},
                       index=[f"ENSG{i:011d}" for i in genes])
    with StoreWriter(str(path), var=var, raw_counts=True, chunk_values=512,
                     shard_values=4096) as w:
        for a in range(0, x.shape[0], block):
            w.append(x[a:a + block], obs.iloc[a:a + block])
    return str(path)


@pytest.fixture(scope="module")
def cells():
    return make_cells(N_CELLS, N_GENES)


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory, cells):
    return write_store(tmp_path_factory.mktemp("loader") / "cells.zarr", *cells)


def stream(loader, n=None):
    out = []
    for i, batch in enumerate(loader):
        out.append(batch)
        if n is not None and i + 1 == n:
            break
    return out


def as_csr(batch) -> sp.csr_matrix:
    b = len(batch[CELL_INDEX])
    return sp.csr_matrix((batch[VALUES], batch[INDICES], batch[INDPTR]), shape=(b, N_GENES))


def assert_same_stream(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x[CELL_INDEX], y[CELL_INDEX])
        np.testing.assert_array_equal(x[VALUES], y[VALUES])
        np.testing.assert_array_equal(x[INDICES], y[INDICES])


@pytest.mark.parametrize("batch_size", [32, 24])  # 24: batches span two shuffle buffers
def test_batches_hold_the_stored_cells(store_uri, cells, batch_size):
    x, obs = cells
    loader = CellLoader(store_uri, obs_columns=["perturbation", "dose"],
                        **{**LOADER, "batch_size": batch_size})
    batches = stream(loader)
    assert len(batches) == loader.num_batches == N_CELLS // batch_size
    assert all(len(b[CELL_INDEX]) == batch_size for b in batches)
    codes = obs["perturbation"].cat.codes.to_numpy()
    for batch in batches:
        idx = batch[CELL_INDEX]
        assert batch[CELL_INDEX].dtype == np.int64 and batch[INDPTR].dtype == np.int64
        assert batch[INDICES].dtype == np.int32 and batch[VALUES].dtype == np.float32
        assert (as_csr(batch) != x[idx]).nnz == 0
        np.testing.assert_array_equal(batch[OBS]["perturbation"], codes[idx])
        np.testing.assert_array_equal(batch[OBS]["dose"], obs["dose"].to_numpy()[idx])
    assert loader.num_dropped == N_CELLS - batch_size * len(batches)


def test_pooled_buffers_are_reused_only_when_no_batch_views_them(store_uri, cells):
    """The shuffle copy writes into pooled arrays: a batch the consumer keeps stays as it
    was while later buffers reuse the arrays of batches it dropped."""
    from pertscale.data.loader import _BufferPool

    pool = _BufferPool(size=2)
    a_idx, _ = pool.take(100)
    b_idx, _ = pool.take(100)
    assert not np.shares_memory(a_idx, b_idx)  # a is still viewed by the test
    del a_idx
    c_idx, _ = pool.take(120)
    assert np.shares_memory(c_idx, pool._pairs[0][0]) and len(c_idx) == 120
    del b_idx
    assert np.shares_memory(pool.take(300)[0], pool._pairs[-1][0])  # b was too small: replaced
    assert len(pool._pairs) == 2

    x, _ = cells
    kept = []
    for i, batch in enumerate(CellLoader(store_uri, **{**LOADER, "buffer_blocks": 2})):
        assert (as_csr(batch) != x[batch[CELL_INDEX]]).nnz == 0
        if i % 5 == 0:
            kept.append(batch)
    for batch in kept:
        assert (as_csr(batch) != x[batch[CELL_INDEX]]).nnz == 0


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_equal_disjoint_complete(store_uri, world_size):
    loaders = [CellLoader(store_uri, rank=r, world_size=world_size, **LOADER)
               for r in range(world_size)]
    streams = [stream(ld) for ld in loaders]
    assert len({len(s) for s in streams}) == 1, "ranks got different numbers of batches"
    assert all(len(b[CELL_INDEX]) == 32 for s in streams for b in s)
    seen = np.concatenate([b[CELL_INDEX] for s in streams for b in s])
    assert len(np.unique(seen)) == len(seen), "a cell was read twice in one epoch"
    assert len(seen) == N_CELLS - loaders[0].num_dropped
    assert loaders[0].num_dropped < world_size * 32
    for ld, s in zip(loaders, streams):  # the loader follows its sampler's plan exactly
        np.testing.assert_array_equal(np.concatenate([b[CELL_INDEX] for b in s]),
                                      ld.sampler.epoch_indices(0))


def test_keep_partial_gives_a_short_last_batch_on_every_rank(store_uri):
    kw = {**LOADER, "remainder": "keep_partial"}
    loaders = [CellLoader(store_uri, rank=r, world_size=2, **kw) for r in range(2)]
    streams = [stream(ld) for ld in loaders]
    assert [len(s) for s in streams] == [16, 16]  # 501 cells per rank -> 15 full + 1 of 21
    assert {len(s[-1][CELL_INDEX]) for s in streams} == {501 - 15 * 32}
    assert loaders[0].num_dropped == 1


def test_epochs_reshuffle_and_iteration_moves_to_the_next_epoch(store_uri):
    loader = CellLoader(store_uri, **LOADER)
    first = np.concatenate([b[CELL_INDEX] for b in stream(loader)])
    assert loader.epoch == 1 and loader.state_dict()["batches_emitted"] == 0
    second = np.concatenate([b[CELL_INDEX] for b in stream(loader)])
    assert not np.array_equal(first, second)
    loader.set_epoch(0)
    np.testing.assert_array_equal(np.concatenate([b[CELL_INDEX] for b in stream(loader)]), first)


@pytest.mark.parametrize("world_size, batch_size", [(2, 32), (3, 32), (2, 24), (3, 24)])
def test_resume_reproduces_the_uninterrupted_stream(store_uri, world_size, batch_size):
    for rank in range(world_size):
        kw = {"rank": rank, "world_size": world_size, **LOADER, "batch_size": batch_size}
        full = stream(CellLoader(store_uri, epoch=2, **kw))
        n = len(full)
        # cut points: start, inside the first buffer, at/after a buffer boundary (64 cells:
        # 2 batches of 32; a batch of 24 straddles it), mid-epoch and just before / at the end
        for cut in sorted({0, 1, 2, 3, n // 2, n - 1, n}):
            first = CellLoader(store_uri, epoch=2, **kw)
            head = stream(first, cut) if cut else []
            state = pickle.loads(pickle.dumps(first.state_dict()))
            resumed = CellLoader(store_uri, **kw)  # fresh process: epoch comes from the state
            resumed.load_state_dict(state)
            tail = stream(resumed)
            if cut == n:  # a state saved at the end of an epoch resumes into the next one
                assert resumed.epoch == 4 and tail and len(tail) == n
                assert_same_stream(head, full)
            else:
                assert_same_stream(head + tail, full)


def test_break_then_continue_on_the_same_loader(store_uri):
    full = stream(CellLoader(store_uri, **LOADER))
    loader = CellLoader(store_uri, **LOADER)
    before = threading.active_count()
    head = stream(loader, 5)
    tail = stream(loader)
    assert_same_stream(head + tail, full)
    assert threading.active_count() <= before, "the prefetch thread outlived its iterator"


def test_pickled_loader_continues_where_it_was(store_uri):
    loader = CellLoader(store_uri, world_size=2, rank=1, **LOADER)
    full = stream(CellLoader(store_uri, world_size=2, rank=1, **LOADER))
    head = stream(loader, 4)
    clone = pickle.loads(pickle.dumps(loader))
    assert_same_stream(head + stream(clone), full)


def test_reads_in_flight_stay_bounded(store_uri):
    loader = CellLoader(store_uri, **LOADER)
    real = loader.store.read_csr_async
    issued, finished, peak = [0], [0], [0]

    class Counted:
        def __init__(self, fut):
            self.fut = fut

        def result(self):
            finished[0] += 1
            return self.fut.result()

    def counting(start, stop):
        issued[0] += 1
        peak[0] = max(peak[0], issued[0] - finished[0])
        assert stop - start <= LOADER["block_size"]
        return Counted(real(start, stop))

    loader.store.read_csr_async = counting
    stream(loader)
    assert issued[0] >= N_CELLS // LOADER["block_size"]
    assert peak[0] <= LOADER["blocks_in_flight"]


def test_read_errors_reach_the_consumer(tmp_path, cells):
    uri = write_store(tmp_path / "broken.zarr", *cells)
    loader = CellLoader(uri, **LOADER)
    for shard in (tmp_path / "broken.zarr" / "X" / "data" / "c").iterdir():
        shard.write_bytes(b"garbage")
    with pytest.raises(Exception) as err:
        stream(loader)
    assert "data" in str(err.value) or "checksum" in str(err.value).lower()


def test_mismatched_state_is_refused(store_uri):
    state = CellLoader(store_uri, **LOADER).state_dict()
    other = CellLoader(store_uri, **{**LOADER, "batch_size": 16})
    with pytest.raises(ValueError, match="batch_size: state 32 != loader 16"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="batches_emitted=999"):
        CellLoader(store_uri, **LOADER).load_state_dict({**state, "batches_emitted": 999})
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict({"epoch": 1})


def test_bad_obs_column_names_the_store_and_columns(store_uri):
    with pytest.raises(ValueError, match=r"\['cell_type'\] not in store .*perturbation"):
        CellLoader(store_uri, obs_columns=["cell_type"], **LOADER)


def test_store_too_small_for_the_ranks(store_uri):
    with pytest.raises(ValueError, match="no batch"):
        CellLoader(store_uri, world_size=4, **{**LOADER, "batch_size": 512})


def test_config_validation_and_build(store_uri):
    with pytest.raises(ConfigError, match="remainder='pad'"):
        LoaderConfig(remainder="pad")
    with pytest.raises(ConfigError, match="block_size=0"):
        LoaderConfig(block_size=0)
    with pytest.raises(ConfigError, match="valid keys"):
        LoaderConfig.from_dict({"batchsize": 3})
    with pytest.raises(ValueError, match="store_uri is empty"):
        build_loader(LoaderConfig())
    cfg = LoaderConfig.from_dict({"store_uri": store_uri, "batch_size": 32, "block_size": 16,
                                  "buffer_blocks": 4, "seed": 7})
    loader = build_loader(cfg, rank=1, world_size=2, epoch=3)
    assert loader.epoch == 3 and loader.sampler.rank == 1 and len(loader) == 15


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="nothing-here"):
        CellLoader(str(tmp_path / "nothing-here"), batch_size=4)


def test_collection_batches_are_in_the_union_gene_space(tmp_path):
    from pertscale.store import open_store
    from pertscale.store.collection import write_collection

    root = tmp_path / "coll"
    xa, obs_a = make_cells(301, N_GENES, seed=1)
    xb, obs_b = make_cells(250, N_GENES, seed=2)
    write_store(root / "members" / "000-a", xa, obs_a)
    write_store(root / "members" / "001-b", xb, obs_b, first_gene=10)  # genes 10..49
    write_collection(str(root), ["members/000-a", "members/001-b"])
    collection = open_store(str(root))
    assert collection.n_genes == N_GENES + 10
    reference = collection.read_csr(0, collection.n_cells)  # blocks of 16 straddle the members
    seen = []
    for rank in range(2):
        for batch in CellLoader(str(root), rank=rank, world_size=2, **LOADER):
            rows = sp.csr_matrix((batch[VALUES], batch[INDICES], batch[INDPTR]),
                                 shape=(len(batch[CELL_INDEX]), collection.n_genes))
            assert (rows != reference[batch[CELL_INDEX]]).nnz == 0
            seen.append(batch[CELL_INDEX])
    seen = np.concatenate(seen)
    assert len(np.unique(seen)) == len(seen) == 2 * (551 // 2 // 32) * 32


def test_bench_loader_command_writes_its_table(tmp_path, capsys):
    import json

    from pertscale.bench import main as bench_main

    rows = {}
    for order in ("shuffled", "source"):
        out = tmp_path / f"loader_{order}.json"
        code = bench_main(["loader", "--n-cells", "3000", "--n-genes", "300", "--nnz-per-cell",
                           "30", "--batch-size", "64", "--grid", "32x8", "--repeats", "1",
                           "--order", order, "--work-dir", str(tmp_path / "new" / order),
                           "--out", str(out)])  # a --work-dir not there yet is made
        assert code == 0
        result = json.loads(out.read_text())
        assert result["order"] == order and result["label"] == "perturbation"
        (row,) = result["loader"]
        rows[order] = row
        assert row["batches"] == 3000 // 64 and row["cells"] == row["batches"] * 64
        assert row["cells_per_s"] == pytest.approx(row["cells"] / row["seconds"])
        # a buffer of 8 blocks' worth of cells may hold parts of 9 blocks (after the short one)
        assert 4 <= row["blocks_per_batch"] <= 9
        assert result["ceiling"]["cells"] == 3000
        assert set(result["ceiling"]["patterns"]) == {"256x16", "1024x16", "4096x8"}
        blocks = result["block_reads"]  # the grid's first block size, every cell once
        assert (blocks["range_cells"], blocks["cells"]) == (32, 3000)
        assert blocks["nnz"] == result["nnz"]
        printed = capsys.readouterr().out
        assert "pertscale 32x8" in printed and "random 32-cell reads" in printed
    # the simulated source is sorted by 100 labels of 30 cells: random batches of 64 hold ~48
    shuffled, source = rows["shuffled"], rows["source"]
    assert shuffled["labels_expected"] == pytest.approx(47.8, abs=0.1)
    assert shuffled["labels_ratio"] > 0.95 and source["labels_ratio"] < 0.5
    assert source["source_blocks_per_batch"] == pytest.approx(source["blocks_per_batch"])
    assert shuffled["source_blocks_per_batch"] > 5 * source["source_blocks_per_batch"]


def test_a_rank_reads_only_the_obs_columns_it_carries(tmp_path, cells):
    """The loader decodes neither the cell ids nor other obs columns: with their arrays gone
    it still streams the same batches (the full obs table would fail to read)."""
    import shutil

    from pertscale.store import StoreError, open_store

    uri = write_store(tmp_path / "c.zarr", *cells)
    expected = stream(CellLoader(uri, obs_columns=["perturbation"], **LOADER))
    shutil.rmtree(tmp_path / "c.zarr" / "obs" / "_index")
    shutil.rmtree(tmp_path / "c.zarr" / "obs" / "dose")
    assert_same_stream(stream(CellLoader(uri, obs_columns=["perturbation"], **LOADER)), expected)
    with pytest.raises(StoreError, match="cannot (open|read) array obs/"):
        _ = open_store(uri).obs
