"""scGPT model: layouts agree, generative mask semantics, heads, conditions, learning."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pertscale.constants import (
    CONDITION_IDS,
    CU_SEQLENS,
    GENE_IDS,
    INDICES,
    INDPTR,
    MASKED,
    OBS,
    PADDING_MASK,
    TARGET_VALUES,
    VALUES,
)
from pertscale.data.tokenizer import Tokenizer, TokenizerConfig
from pertscale.models.scgpt import ScGPTConfig, build_scgpt

torch.set_num_threads(2)
N_GENES = 150
VOCAB_SIZE = N_GENES + 3


def _csr(n_cells=5, seed=0):
    rng = np.random.default_rng(seed)
    m = sp.random(n_cells, N_GENES, density=0.2, random_state=rng, format="csr",
                  data_rvs=lambda n: rng.poisson(3, n) + 1).astype(np.float32)
    return {INDPTR: m.indptr.astype(np.int64), INDICES: m.indices.astype(np.int32),
            VALUES: m.data, OBS: {"cond": np.arange(n_cells) % 3}}


def _tokens(layout, seed=0, **cfg):
    tok = Tokenizer(TokenizerConfig(max_seq_len=48, **cfg), range(VOCAB_SIZE))
    return tok(_csr(), layout=layout, generator=torch.Generator().manual_seed(seed))


def _model(**overrides):
    torch.manual_seed(0)
    return build_scgpt(ScGPTConfig(flavor="debug", **overrides), range(VOCAB_SIZE)).double()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("generative", [False, True], ids=["full", "generative"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["postnorm", "prenorm"])
def test_packed_and_padded_layouts_agree(generative, norm_first):
    """The same cells give the same loss, predictions, cell embeddings and gradients."""
    results = {}
    for layout, backend in [("padded", "sdpa"), ("packed", "varlen"), ("packed", "reference")]:
        model = _model(generative=generative, norm_first=norm_first, attention=backend)
        batch = _tokens(layout)
        out = model(batch)
        out.loss.backward()
        preds = out.outputs["predictions"]
        if layout == "padded":
            preds = preds[~batch[PADDING_MASK]]
        results[(layout, backend)] = (out.loss.detach(), preds, out.outputs["cell_emb"],
                                      _grads(model))
    ref = results[("packed", "reference")]
    for key, got in results.items():
        torch.testing.assert_close(got[0], ref[0], msg=f"loss {key}")
        torch.testing.assert_close(got[1], ref[1], msg=f"predictions {key}")
        torch.testing.assert_close(got[2], ref[2], msg=f"cell_emb {key}")
        for name in ref[3]:
            torch.testing.assert_close(got[3][name], ref[3][name], msg=f"grad {name} {key}")


@pytest.mark.parametrize("generative", [False, True])
def test_generative_mask_hides_other_unknown_genes(generative):
    """With the generative mask, a masked gene's prediction ignores which other genes are
    masked-and-unknown; with full attention it does not."""
    model = _model(generative=generative).eval()
    batch = _tokens("packed")
    cu = batch[CU_SEQLENS]
    masked = batch[MASKED][cu[0]:cu[1]].nonzero().squeeze(1) + cu[0]
    assert len(masked) >= 2
    changed = dict(batch, **{GENE_IDS: batch[GENE_IDS].clone()})
    changed[GENE_IDS][masked[0]] = (batch[GENE_IDS][masked[0]] + 7 - 3) % N_GENES + 3
    with torch.no_grad():
        before = model(batch).outputs["predictions"]
        after = model(changed).outputs["predictions"]
    others = masked[1:]
    if generative:
        torch.testing.assert_close(after[others], before[others])
    else:
        assert not torch.allclose(after[others], before[others])
    torch.testing.assert_close(after[cu[1]:], before[cu[1]:])  # other cells never see it


def test_loss_reads_only_masked_targets_and_reports_metrics():
    model = _model()
    batch = _tokens("packed")
    out = model(batch)
    changed = dict(batch, **{TARGET_VALUES: batch[TARGET_VALUES].clone()})
    changed[TARGET_VALUES][~batch[MASKED]] += 5.0
    torch.testing.assert_close(model(changed).loss, out.loss)
    assert int(out.counts["n_masked"]) == int(batch[MASKED].sum())
    expected = out.metrics["mlm_mse"] + out.metrics["gepc_mse"]
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.outputs["cell_emb"].shape == (5, 64)


def test_condition_embedding_changes_output_and_is_required():
    model = _model(n_conditions=3)
    batch = _tokens("packed", condition_key="cond")
    base = model(batch).outputs["cell_emb"]
    shifted = model(dict(batch, **{CONDITION_IDS: (batch[CONDITION_IDS] + 1) % 3}))
    assert not torch.allclose(shifted.outputs["cell_emb"], base)
    with pytest.raises(ValueError, match="condition_ids"):
        model(_tokens("packed"))


@pytest.mark.parametrize("value_encoder", ["continuous", "category"])
def test_debug_model_beats_the_mean_on_a_fixed_batch(value_encoder):
    """A few Adam steps bring the loss (MLM + GEPC) below what predicting the batch's mean
    masked value would score (2 x its variance): the model learns gene-specific values."""
    model = _model(value_encoder=value_encoder).float()
    batch = _tokens("packed")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        out = model(batch)
        out.loss.backward()
        opt.step()
    mean_predictor_loss = 2 * batch[TARGET_VALUES][batch[MASKED]].var(unbiased=False)
    assert out.loss.item() < 0.9 * mean_predictor_loss.item()


def test_small_flavor_is_scgpt_size():
    cfg = ScGPTConfig(flavor="small")
    size = cfg.size()
    assert (size.d_model, size.n_layers, size.n_heads, size.d_ff) == (512, 12, 8, 512)
    assert ScGPTConfig(flavor="small", n_layers=4).size().n_layers == 4
