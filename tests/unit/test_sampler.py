"""BlockSampler: equal shares, disjoint ranks, completeness, remainder policies, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from pertscale.data.sampler import BlockSampler


def samplers(n_cells, world_size, **kw):
    kw = {"batch_size": 8, "block_size": 5, "buffer_cells": 12, "seed": 3, **kw}
    return [BlockSampler(n_cells, rank=r, world_size=world_size, **kw) for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("remainder", ["drop_last", "keep_partial"])
@pytest.mark.parametrize("n_cells", [97, 120, 301])
def test_ranks_disjoint_equal_and_complete(world_size, remainder, n_cells):
    ranks = samplers(n_cells, world_size, remainder=remainder)
    streams = [s.epoch_indices(epoch=1) for s in ranks]
    counts = {s.num_batches for s in ranks}
    assert len(counts) == 1, "every rank must get the same number of batches"
    for s, stream in zip(ranks, streams):
        assert len(stream) == s.cells_per_rank
        assert len(s.batch_indices(1)) == s.num_batches
    seen = np.concatenate(streams)
    assert len(np.unique(seen)) == len(seen), "a cell appears twice in the epoch"
    assert seen.min() >= 0 and seen.max() < n_cells
    assert len(seen) + ranks[0].num_dropped == n_cells
    if remainder == "drop_last":
        assert ranks[0].num_dropped < world_size * 8
        assert all(len(b) == 8 for s in ranks for b in s.batch_indices(1))
    else:
        assert ranks[0].num_dropped < world_size
        last = {len(s.batch_indices(1)[-1]) for s in ranks}
        assert len(last) == 1


def test_exact_multiple_drops_nothing():
    ranks = samplers(96, 3, batch_size=8)
    assert ranks[0].num_dropped == 0
    assert sorted(np.concatenate([s.epoch_indices(0) for s in ranks])) == list(range(96))


def test_dropped_cells_change_across_epochs():
    (s,) = samplers(101, 1, batch_size=10, block_size=7)
    left_out = [set(range(101)) - set(s.epoch_indices(e).tolist()) for e in range(6)]
    assert all(len(x) == s.num_dropped == 1 for x in left_out)
    assert len(set().union(*left_out)) > 1, "the same cells are dropped every epoch"


def test_deterministic_in_seed_and_epoch():
    a, b = samplers(200, 1)[0], samplers(200, 1)[0]
    np.testing.assert_array_equal(a.epoch_indices(4), b.epoch_indices(4))
    assert not np.array_equal(a.epoch_indices(4), a.epoch_indices(5))
    other = BlockSampler(200, batch_size=8, block_size=5, buffer_cells=12, seed=4)
    assert not np.array_equal(a.epoch_indices(4), other.epoch_indices(4))


def test_reads_are_contiguous_blocks():
    (s,) = samplers(1000, 1, block_size=50, buffer_cells=200)
    ranges = s.rank_ranges(0)
    lengths = ranges[:, 1] - ranges[:, 0]
    assert lengths.sum() == s.cells_per_rank
    assert (lengths <= 50).all() and (lengths > 0).all()
    for plan in s.buffers(0):
        assert (plan.ranges[:, 1] - plan.ranges[:, 0]).sum() == plan.num_rows <= 200


def test_batches_mix_blocks():
    """A shuffle buffer of 8 blocks spreads each batch over several source blocks."""
    (s,) = samplers(4000, 1, batch_size=64, block_size=100, buffer_cells=800)
    distinct = [len(np.unique(b // 100)) for b in s.batch_indices(0)]
    assert np.mean(distinct) > 6


def test_locate_points_into_buffers():
    (s,) = samplers(200, 1, batch_size=8, buffer_cells=12)
    assert s.locate(0) == (0, 0)
    assert s.locate(1) == (0, 8)
    assert s.locate(2) == (1, 4)
    with pytest.raises(ValueError, match="batches_emitted=99"):
        s.locate(99)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size=0"),
    ({"block_size": -1}, "block_size=-1"),
    ({"rank": 2, "world_size": 2}, "rank=2"),
    ({"remainder": "pad"}, "remainder='pad'"),
    ({"batch_size": 64, "world_size": 2}, "no batch"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    kw = {"batch_size": 8, "block_size": 5, "buffer_cells": 12, **kwargs}
    with pytest.raises(ValueError, match=message):
        BlockSampler(100, **kw)
