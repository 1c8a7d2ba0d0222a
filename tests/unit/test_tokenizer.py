"""Tokenizer: scGPT binning, <cls>, sampling, masking, packed == padded, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pertscale.config import ConfigError
from pertscale.constants import (
    CLS_ID,
    CONDITION_IDS,
    CU_SEQLENS,
    GENE_IDS,
    INDICES,
    INDPTR,
    MASK_VALUE,
    MASKED,
    MAX_SEQLEN,
    OBS,
    PAD_ID,
    PAD_VALUE,
    PADDING_MASK,
    TARGET_VALUES,
    VALUE_IDS,
    VALUES,
)
from pertscale.data.tokenizer import Tokenizer, TokenizerConfig, bin_values

N_GENES = 300
VOCAB = ["<pad>", "<cls>", "<mask>"] + [f"g{i}" for i in range(N_GENES)]


def _csr_batch(n_cells=12, density=0.2, seed=0, counts=True):
    rng = np.random.default_rng(seed)
    m = sp.random(n_cells, N_GENES, density=density, random_state=rng, format="csr",
                  data_rvs=lambda n: rng.poisson(3, n) + 1 if counts else rng.lognormal(0, 1, n))
    m = m.astype(np.float32)
    return {INDPTR: m.indptr.astype(np.int64), INDICES: m.indices.astype(np.int32),
            VALUES: m.data, OBS: {"condition": rng.integers(0, 3, n_cells)}}, m


def _scgpt_binning(row: np.ndarray, n_bins: int, u: np.ndarray) -> np.ndarray:
    """scGPT's preprocess.binning for one cell's nonzero values, side="both"."""
    edges = np.quantile(row, np.linspace(0, 1, n_bins - 1))
    left, right = np.digitize(row, edges), np.digitize(row, edges, right=True)
    return np.ceil(u * (left - right) + right).astype(np.int64)


@pytest.mark.parametrize("n_bins", [5, 11, 51])
def test_bin_values_matches_scgpt_per_cell(n_bins):
    rng = np.random.default_rng(n_bins)
    lengths = [1, 2, 3, 7, 49, 50, 51, 101, 300, 1000]
    rows = [rng.poisson(2, n).astype(np.float32) + 1 for n in lengths[::2]] + \
           [rng.lognormal(0, 1, n).astype(np.float32) for n in lengths[1::2]]
    lengths = lengths[::2] + lengths[1::2]
    row_N = np.repeat(np.arange(len(rows)), lengths)
    vals = np.concatenate(rows)
    u = rng.random(len(vals))
    got = bin_values(row_N, vals, len(rows), n_bins, u)
    expected = np.concatenate([_scgpt_binning(r, n_bins, u[row_N == i])
                               for i, r in enumerate(rows)])
    np.testing.assert_array_equal(got, expected)
    assert got.min() >= 1 and got.max() <= n_bins - 1


def test_packed_tokens_follow_the_cells():
    batch, m = _csr_batch()
    tok = Tokenizer(TokenizerConfig(max_seq_len=1000, mask_ratio=0.25), VOCAB)
    out = tok(batch, layout="packed", generator=torch.Generator().manual_seed(0))
    cu = out[CU_SEQLENS].numpy()
    assert out[MAX_SEQLEN] == int(np.diff(cu).max())
    for i in range(m.shape[0]):
        ids = out[GENE_IDS][cu[i]:cu[i + 1]].numpy()
        assert ids[0] == CLS_ID
        np.testing.assert_array_equal(ids[1:], m[i].indices + 3)
        tgt = out[TARGET_VALUES][cu[i]:cu[i + 1]].numpy()
        assert tgt[0] == PAD_VALUE and (tgt[1:] >= 1).all() and (tgt[1:] <= 50).all()
        # higher values never get a lower bin than... the largest value gets the top bin
        assert tgt[1:][np.argmax(m[i].data)] == 50 or len(set(m[i].data)) == 1
        msk = out[MASKED][cu[i]:cu[i + 1]].numpy()
        assert not msk[0] and msk.sum() == int((len(ids) - 1) * 0.25)
        vals = out[VALUE_IDS][cu[i]:cu[i + 1]].numpy()
        np.testing.assert_array_equal(vals[msk], MASK_VALUE)
        np.testing.assert_array_equal(vals[~msk], tgt[~msk])


def test_padded_equals_packed_from_same_generator_state():
    batch, _ = _csr_batch(seed=2)
    tok = Tokenizer(TokenizerConfig(max_seq_len=40), VOCAB)
    packed = tok(batch, layout="packed", generator=torch.Generator().manual_seed(5))
    padded = tok(batch, layout="padded", generator=torch.Generator().manual_seed(5))
    valid = ~padded[PADDING_MASK]
    for key in (GENE_IDS, VALUE_IDS, TARGET_VALUES, MASKED):
        torch.testing.assert_close(padded[key][valid], packed[key])
    assert (padded[GENE_IDS][~valid] == PAD_ID).all()
    assert (padded[VALUE_IDS][~valid] == PAD_VALUE).all()
    assert not padded[MASKED][~valid].any()


def test_sampling_caps_length_and_keeps_gene_order():
    batch, m = _csr_batch(density=0.5, seed=3)
    tok = Tokenizer(TokenizerConfig(max_seq_len=20), VOCAB)
    out = tok(batch, layout="packed")
    cu = out[CU_SEQLENS].numpy()
    assert (np.diff(cu) == 20).all()
    for i in range(m.shape[0]):
        ids = out[GENE_IDS][cu[i] + 1:cu[i + 1]].numpy() - 3
        assert (np.diff(ids) > 0).all() and set(ids) <= set(m[i].indices)


def test_deterministic_given_generator_and_resumable_state():
    batch, _ = _csr_batch(seed=4)
    tok = Tokenizer(TokenizerConfig(max_seq_len=30, seed=7), VOCAB)
    state = tok.state_dict()
    first = [tok(batch) for _ in range(2)]
    tok.load_state_dict(state)
    again = [tok(batch) for _ in range(2)]
    for a, b in zip(first, again):
        torch.testing.assert_close(a[VALUE_IDS], b[VALUE_IDS])
        torch.testing.assert_close(a[GENE_IDS], b[GENE_IDS])
    assert not torch.equal(first[0][MASKED], first[1][MASKED])


def test_allowed_genes_and_include_zeros():
    batch, m = _csr_batch(seed=5)
    hvg = np.arange(0, N_GENES, 10)
    out = Tokenizer(TokenizerConfig(max_seq_len=1000), VOCAB, allowed_genes=hvg)(batch)
    genes = out[GENE_IDS].numpy()
    assert set(genes[genes != CLS_ID] - 3) <= set(hvg)
    zeros = Tokenizer(TokenizerConfig(max_seq_len=1000, include_zeros=True), VOCAB,
                      allowed_genes=hvg)(batch, layout="padded")
    assert zeros[GENE_IDS].shape == (m.shape[0], len(hvg) + 1)
    dense = m.toarray()[:, hvg]
    np.testing.assert_array_equal((zeros[TARGET_VALUES][:, 1:].numpy() == 0), dense == 0)


def test_condition_ids_from_obs():
    batch, _ = _csr_batch(seed=6)
    out = Tokenizer(TokenizerConfig(condition_key="condition"), VOCAB)(batch)
    np.testing.assert_array_equal(out[CONDITION_IDS].numpy(), batch[OBS]["condition"])
    with pytest.raises(ValueError, match="'donor'.*condition"):
        Tokenizer(TokenizerConfig(condition_key="donor"), VOCAB)(batch)


@pytest.mark.parametrize("field,value", [("n_bins", 2), ("mask_ratio", 1.0), ("layout", "ragged"),
                                         ("max_seq_len", 1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        TokenizerConfig(**{field: value})


def test_bad_input_errors():
    batch, _ = _csr_batch()
    tok = Tokenizer(TokenizerConfig(), VOCAB)
    with pytest.raises(ValueError, match="gene index 300"):
        tok({**batch, INDICES: np.full_like(batch[INDICES], 300)})
    with pytest.raises(ValueError, match="'indptr'"):
        tok({INDICES: batch[INDICES], VALUES: batch[VALUES]})
    with pytest.raises(ValueError, match="allowed_genes"):
        Tokenizer(TokenizerConfig(), VOCAB, allowed_genes=[5, 400])


def test_unsorted_csr_rows_give_the_same_tokens():
    batch, m = _csr_batch(seed=7)
    rng = np.random.default_rng(0)
    perm = np.concatenate([rng.permutation(np.arange(s, e))
                           for s, e in zip(m.indptr[:-1], m.indptr[1:])])
    shuffled = {**batch, INDICES: batch[INDICES][perm], VALUES: batch[VALUES][perm]}
    tok = Tokenizer(TokenizerConfig(max_seq_len=1000), VOCAB)
    a = tok(batch, generator=torch.Generator().manual_seed(1))
    b = tok(shuffled, generator=torch.Generator().manual_seed(1))
    for key in (GENE_IDS, TARGET_VALUES, CU_SEQLENS):
        torch.testing.assert_close(a[key], b[key])
