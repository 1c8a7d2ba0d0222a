"""pathway_vae: the sparse hard mask equals the dense reference (forward and backward), what the
soft masks do at non-member genes, the expression inputs, the likelihoods, and embedding."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats
import torch

from pertscale.config import ConfigError
from pertscale.constants import (
    CELL_INDEX,
    CLS_ID,
    CU_SEQLENS,
    EXPRESSION,
    GENE_IDS,
    GENE_MEASURED,
    INDICES,
    INDPTR,
    LIBRARY_SIZE,
    VALUES,
    X_RECON,
)
from pertscale.data.expression import ExpressionInputs
from pertscale.data.pathways import PathwaySelection
from pertscale.models.pathway_vae import (
    PathwayVAEConfig,
    build_pathway_vae,
    nb_log_likelihood,
    resolve_likelihood,
)

torch.set_num_threads(2)
N_GENES = 40
SYMBOLS = [f"G{i}" for i in range(N_GENES)]
VOCAB = ["<pad>", "<cls>", "<mask>", *[f"ENSG{i}" for i in range(N_GENES)]]
# pathway 2 has one gene no cell expresses; pathway 3 has no gene of this panel at all
SELECTION = PathwaySelection(
    term_ids=["GO:1", "GO:2", "GO:3", "GO:4"], names=["a", "b", "c", "d"],
    genes=[[f"G{i}" for i in range(12)], [f"G{i}" for i in range(8, 20)],
           ["G39"], ["X1", "X2"]],
    report=[("rule", 0, 4)])


def _csr_batch(n_cells: int, seed: int, *, empty_cell: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(0.5, 2.0, (n_cells, N_GENES))).astype(np.float32)
    x[:, 39] = 0
    if empty_cell:
        x[1] = 0  # a cell with no counts at all
    m = sp.csr_matrix(x)
    return {INDPTR: m.indptr.astype(np.int64), INDICES: m.indices.astype(np.int32),
            VALUES: m.data, CELL_INDEX: np.arange(n_cells)}


def _context(likelihood="nb", selection=SELECTION):
    return {"vocab": VOCAB, "gene_symbols": SYMBOLS, "pathways": selection.to_dict(),
            "likelihood": likelihood}


def _model(mask="hard", **overrides):
    torch.manual_seed(0)
    cfg = PathwayVAEConfig(mask=mask, attention="reference", d_model=16, n_heads=2, d_ff=32,
                           latent_dim=4, decoder_hidden=16, **overrides)
    return build_pathway_vae(cfg, _context()).double()


def _inputs(batch, max_seq_len=64):
    return ExpressionInputs(N_GENES, raw_counts=True, target="counts",
                            max_seq_len=max_seq_len)(batch, torch.Generator().manual_seed(0))


def test_sparse_hard_mask_equals_dense_reference_forward_and_backward():
    model = _model("hard")
    inputs = _inputs(_csr_batch(6, seed=1))
    grads = []
    for dense in (False, True):
        model.zero_grad()
        torch.manual_seed(1)  # the same reparameterisation noise
        out = model(inputs, dense=dense)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if not dense:
            sparse_out = out
    np.testing.assert_allclose(sparse_out.outputs["activities"], out.outputs["activities"],
                               rtol=0, atol=1e-5)
    loss_a, loss_b = float(sparse_out.loss.detach()), float(out.loss.detach())
    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_b)
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-5, atol=1e-5, msg=name)
    # the pathway attention's own weights get gradients (the comparison is not vacuous)
    assert grads[0]["encoder.pathways.query"].abs().sum() > 0


def test_hard_mask_ignores_non_member_genes():
    """A pathway's activity does not move when only genes outside it change."""
    model = _model("hard", n_layers=0)  # no self-attention: nothing mixes genes before the mask
    model.eval()
    x = _csr_batch(4, seed=2, empty_cell=False)
    dense = sp.csr_matrix((x[VALUES], x[INDICES], x[INDPTR]), shape=(4, N_GENES)).toarray()
    changed = dense.copy()
    changed[:, 20:39] = changed[:, 20:39] * 3 + 1  # genes of no pathway
    acts = []
    for values in (dense, changed):
        m = sp.csr_matrix(np.log1p(values).astype(np.float32))
        batch = {INDPTR: m.indptr.astype(np.int64), INDICES: m.indices, VALUES: m.data,
                 CELL_INDEX: np.arange(4)}
        # values as stored (a normalised store), so a member's input does not move either
        inputs = ExpressionInputs(N_GENES, raw_counts=False, target="log1p", max_seq_len=64)
        acts.append(model.encoder(inputs(batch))[0].detach())
    torch.testing.assert_close(acts[0][:, :2], acts[1][:, :2], rtol=1e-6, atol=1e-6)


def test_pathway_without_expressed_members_attends_to_the_null_token():
    """Pathway 2 (a gene no cell expresses), pathway 3 (no gene of the panel) and every pathway
    of a cell with no counts read out the null token: finite, the same in every cell."""
    model = _model("hard")
    model.eval()
    act = model(_inputs(_csr_batch(5, seed=3))).outputs["activities"]
    enc = model.encoder
    with torch.no_grad():
        null_out = enc.pathways.out_proj(enc.pathways.null_kv[1].flatten())
        expected = enc.readout_PC @ null_out + enc.readout_bias_P
    torch.testing.assert_close(act[1], expected)  # the cell with no counts
    for p in (2, 3):
        torch.testing.assert_close(act[:, p], expected[p].expand(5))
    assert not torch.allclose(act[0, :2], expected[:2])  # expressed members do count


def test_soft_masks_at_non_member_genes():
    """The seed's soft mask (scores x sigmoid(W), W = M + noise) keeps every gene in the
    softmax: a non-member gene weighs as much as exp(0.5 s). The gated variant starts as the hard
    mask (non-members at sigmoid(-gate_logit)) and equals it as gate_logit grows."""
    hard, soft, gate = _model("hard"), _model("soft"), _model("soft_gate", gate_logit=30.0)
    batch = _inputs(_csr_batch(4, seed=6, empty_cell=False))
    for m in (hard, soft, gate):
        m.eval()
    with torch.no_grad():
        for m in (soft, gate):
            m.encoder.load_state_dict({k: v for k, v in hard.encoder.state_dict().items()},
                                      strict=False)
        a_hard = hard(batch).outputs["activities"]
        a_soft = soft(batch).outputs["activities"]
        a_gate = gate(batch).outputs["activities"]
    torch.testing.assert_close(a_gate, a_hard, rtol=1e-6, atol=1e-6)
    assert float((a_soft - a_hard).abs().max()) > 1e-3
    sig = torch.sigmoid(soft.encoder.pathways.w_mask).detach()
    member = soft.encoder.pathways.mask_PV
    # at initialisation: members near sigmoid(1), non-members near sigmoid(0) = 0.5
    assert float(sig[member].mean()) == pytest.approx(float(torch.sigmoid(torch.tensor(1.0))),
                                                      abs=0.01)
    assert float(sig[~member].mean()) == pytest.approx(0.5, abs=0.01)


def test_expression_inputs_normalise_sample_and_target():
    batch = _csr_batch(5, seed=7)
    x = sp.csr_matrix((batch[VALUES], batch[INDICES], batch[INDPTR]), shape=(5, N_GENES))
    out = ExpressionInputs(N_GENES, raw_counts=True, target="counts", max_seq_len=9)(
        batch, torch.Generator().manual_seed(0))
    cu = out[CU_SEQLENS].numpy()
    lengths = np.diff(cu)
    nnz = np.diff(x.indptr)
    np.testing.assert_array_equal(lengths, np.minimum(nnz, 8) + 1)  # <cls> + at most 8 genes
    assert lengths[1] == 1  # the empty cell: <cls> alone
    totals = np.asarray(x.sum(1)).ravel()
    for c in range(5):
        ids = out[GENE_IDS][cu[c]:cu[c + 1]].numpy()
        vals = out[EXPRESSION][cu[c]:cu[c + 1]].numpy()
        assert ids[0] == CLS_ID and vals[0] == 1.0
        genes = ids[1:] - 3
        assert np.all(np.diff(genes) > 0)  # gene order kept
        row = x[c].toarray().ravel()
        np.testing.assert_allclose(vals[1:], np.log1p(row[genes] / totals[c] * 1e4), rtol=1e-6)
    np.testing.assert_array_equal(out[X_RECON].numpy(), x.toarray())
    np.testing.assert_allclose(out[LIBRARY_SIZE].numpy(), totals)
    again = ExpressionInputs(N_GENES, raw_counts=True, target="counts", max_seq_len=9)(
        batch, torch.Generator().manual_seed(0))
    assert torch.equal(again[GENE_IDS], out[GENE_IDS])  # same generator state, same sample
    other = ExpressionInputs(N_GENES, raw_counts=True, target="counts", max_seq_len=9)(
        batch, torch.Generator().manual_seed(1))
    assert not torch.equal(other[GENE_IDS], out[GENE_IDS])


def test_expression_inputs_log_target_and_collection_measured_genes():
    batch = _csr_batch(4, seed=8)
    measured = (np.array([0, 2, 4]), np.array([[True] * N_GENES, [True] * 20 + [False] * 20]))
    out = ExpressionInputs(N_GENES, raw_counts=True, target="log1p", max_seq_len=64,
                           measured=measured)(batch)
    x = sp.csr_matrix((batch[VALUES], batch[INDICES], batch[INDPTR]), shape=(4, N_GENES))
    totals = np.maximum(np.asarray(x.sum(1)), 1e-12)
    np.testing.assert_allclose(out[X_RECON].numpy(), np.log1p(x.toarray() / totals * 1e4),
                               rtol=1e-6)
    np.testing.assert_array_equal(out[GENE_MEASURED].numpy(), measured[1][[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="raw-count.*normalised values"):
        ExpressionInputs(N_GENES, raw_counts=False, target="counts", max_seq_len=64)


def test_unmeasured_genes_do_not_enter_the_loss():
    model = _model("hard")
    inputs = _inputs(_csr_batch(4, seed=9))
    out_BG = torch.randn(4, N_GENES, dtype=torch.float64)
    full = model.reconstruction_nll(out_BG, inputs)
    changed = dict(inputs)
    changed[X_RECON] = inputs[X_RECON].clone()
    changed[X_RECON][:, 30:] += 5
    changed[GENE_MEASURED] = torch.arange(N_GENES)[None].expand(4, -1) < 30
    part = model.reconstruction_nll(out_BG, changed)
    inputs[GENE_MEASURED] = changed[GENE_MEASURED]
    assert torch.allclose(part, model.reconstruction_nll(out_BG, inputs))
    assert torch.all(part < full)


def test_nb_log_likelihood_matches_scipy():
    x = torch.tensor([0.0, 1.0, 3.0, 20.0], dtype=torch.float64)
    mu = torch.tensor([0.5, 2.0, 3.0, 10.0], dtype=torch.float64)
    theta = torch.tensor([0.3, 1.0, 5.0, 2.0], dtype=torch.float64)
    ours = nb_log_likelihood(x, mu.log(), theta.log())
    ref = scipy.stats.nbinom.logpmf(x.numpy(), theta.numpy(), (theta / (theta + mu)).numpy())
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10)


def test_likelihood_follows_the_store_value_kind():
    cfg = PathwayVAEConfig()
    assert resolve_likelihood(cfg, True) == "nb"
    assert resolve_likelihood(cfg, False) == "gaussian"
    with pytest.raises(ConfigError, match="likelihood='nb' needs raw counts"):
        resolve_likelihood(PathwayVAEConfig(likelihood="nb"), False)
    with pytest.raises(ConfigError, match="mask='dense' is not one of"):
        PathwayVAEConfig(mask="dense")


@pytest.mark.parametrize("mask", ["hard", "soft", "soft_gate"])
def test_encoder_backends_agree(mask):
    """The varlen and reference encoder backends give the same activities under every mask."""
    batch = _inputs(_csr_batch(5, seed=10))
    outs = []
    for backend in ("reference", "varlen"):
        torch.manual_seed(0)
        cfg = PathwayVAEConfig(mask=mask, attention=backend, d_model=16, n_heads=2, d_ff=32,
                               latent_dim=4, decoder_hidden=16)
        model = build_pathway_vae(cfg, _context()).eval()
        outs.append(model(batch).outputs["activities"])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
