"""Inputs prepared in a background thread: the same tokens as on the training thread, the
loader position of each batch for an exact resume, and no work on the consumer's thread."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from test_loader import LOADER, make_cells, write_store  # tests/unit is on sys.path

from pertscale.constants import CELL_INDEX, CU_SEQLENS, GENE_IDS
from pertscale.data.loader import CellLoader
from pertscale.data.tokenizer import Tokenizer, TokenizerConfig
from pertscale.training.flops import sequence_work
from pertscale.training.inputs import InputStream, batch_generator


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("inputs") / "cells.zarr", *make_cells(300, 40))


def _stream(store_uri, state=None, record=None):
    loader = CellLoader(store_uri, **LOADER)
    if state is not None:
        loader.load_state_dict(state)
    tok = Tokenizer(TokenizerConfig(max_seq_len=16, mask_ratio=0.4), range(40 + 3))

    def make_inputs(batch, generator):
        if record is not None:
            record.append(threading.current_thread().name)
        return tok(batch, generator=generator)

    return loader, InputStream(loader, make_inputs, seed=3, rank=0, work=sequence_work)


def _items(stream, n=None):
    out = []
    with contextlib.closing(stream.epoch_items()) as items:
        for item in items:
            out.append(item)
            if n is not None and len(out) == n:
                break
    return out


def test_inputs_equal_those_made_on_the_training_thread(store_uri):
    threads: list[str] = []
    loader, stream = _stream(store_uri, record=threads)
    items = _items(stream)
    assert len(items) == loader.num_batches == 9
    assert set(threads) == {"InputStream-rank0"}  # never the consumer's thread
    tok = Tokenizer(TokenizerConfig(max_seq_len=16, mask_ratio=0.4), range(43))
    for i, item in enumerate(items):
        expected = tok(item.batch, generator=batch_generator(3, 0, 0, i))
        assert item.inputs.keys() == expected.keys()
        for key in (GENE_IDS, CU_SEQLENS):
            torch.testing.assert_close(item.inputs[key], expected[key])
        assert (item.tokens, item.sum_sq_len) == sequence_work(expected)
        assert item.position == {**loader.state_dict(), "epoch": 0, "batches_emitted": i + 1}
        assert item.at_epoch_end == (i == 8)


def test_resume_from_a_consumed_batch_position_is_exact(store_uri):
    """The thread runs ahead of the consumer; resuming from the position of the last consumed
    batch gives exactly the rest of the uninterrupted stream, tokens included."""
    _, full = _stream(store_uri)
    uninterrupted = _items(full)
    loader, first = _stream(store_uri)
    head = _items(first, n=4)
    assert loader.state_dict()["batches_emitted"] >= 4  # the loader itself is not where we are
    _, resumed = _stream(store_uri, state=head[-1].position)
    tail = _items(resumed)
    assert len(head) + len(tail) == len(uninterrupted)
    for a, b in zip(head + tail, uninterrupted):
        assert (a.batch[CELL_INDEX] == b.batch[CELL_INDEX]).all()
        torch.testing.assert_close(a.inputs[GENE_IDS], b.inputs[GENE_IDS])


def test_a_failing_make_inputs_raises_in_the_consumer(store_uri):
    loader = CellLoader(store_uri, **LOADER)

    def broken(batch, generator):
        raise ValueError("gene 7 is not in the vocabulary")

    with pytest.raises(ValueError, match="gene 7 is not in the vocabulary"):
        _items(InputStream(loader, broken, seed=0, rank=0))


def test_batch_generators_differ_by_position():
    draws = {(r, e, i): torch.rand(4, generator=batch_generator(0, r, e, i)).tolist()
             for r in (0, 1) for e in (0, 1) for i in (0, 1)}
    assert len({tuple(v) for v in draws.values()}) == 8
    assert torch.rand(4, generator=batch_generator(0, 1, 0, 1)).tolist() == draws[(1, 0, 1)]
