"""GEARS: the loss is the reference's (autofocus, per-perturbation averaging) with a direction
term that has a gradient and a proper Gaussian NLL; perturbations compose by sign; graphs and
gene embeddings are computed once for the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pertscale.config import ConfigError
from pertscale.constants import (
    CONDITION,
    CONTROL_MEAN,
    DELTA_SIGN,
    LOSS_GENES,
    PERT_GENES,
    PERT_SIGNS,
    X_CONTROL,
    X_TARGET,
)
from pertscale.models.gears import GEARS, GEARSConfig, _group_mean

G, P, H = 7, 5, 8


def _model(**overrides) -> GEARS:
    torch.manual_seed(0)
    ring = torch.tensor([[i for i in range(G)], [(i + 1) % G for i in range(G)]])
    chain = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    return GEARS(GEARSConfig(hidden=H, **overrides), G, P, coexpress_edges=ring,
                 coexpress_weight=torch.full((G,), 0.5), go_edges=chain,
                 go_weight=torch.full((4,), 0.3))


def _inputs(genes, signs, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(group)
    return {X_CONTROL: torch.rand(B, G, generator=g), X_TARGET: torch.rand(B, G, generator=g),
            PERT_GENES: torch.tensor(genes), PERT_SIGNS: torch.tensor(signs, dtype=torch.float32),
            CONDITION: torch.tensor(group), LOSS_GENES: torch.ones(B, G, dtype=torch.bool),
            CONTROL_MEAN: torch.full((B, G), 0.5),
            DELTA_SIGN: torch.sign(torch.randn(B, G, generator=g))}


BATCH = _inputs([[0, -1], [0, -1], [1, 2], [3, -1]], [[1, 0], [1, 0], [1, -1], [-1, 0]],
                [0, 0, 1, 2])


def test_every_parameter_is_trained_and_loss_is_finite():
    model = _model(uncertainty=True)
    out = model(BATCH)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert set(out.metrics) == {"autofocus", "direction", "mse", "nll"}
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused


def test_loss_is_the_per_perturbation_mean_of_autofocus_plus_direction():
    model = _model(gamma=2.0, direction_lambda=0.1, direction_sharpness=10.0, direction="cell")
    model.eval()  # fixed BatchNorm statistics: delta can be read back unchanged
    out = model(BATCH)
    delta = out.outputs["delta"]
    y_hat = BATCH[X_CONTROL] + delta
    err = (BATCH[X_TARGET] - y_hat).abs() ** 4
    direction = (torch.sign(BATCH[X_TARGET] - 0.5) - torch.tanh(10 * (y_hat - 0.5))) ** 2
    per_cell = err.mean(1) + 0.1 * direction.mean(1)
    # perturbation 0 has two cells: averaged first, then over the three perturbations
    expected = (per_cell[:2].mean() + per_cell[2] + per_cell[3]) / 3
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_mean_direction_compares_the_change_with_the_conditions_mean_change():
    model = _model(gamma=2.0, direction_lambda=0.5, direction_sharpness=3.0, direction="mean")
    model.eval()
    out = model(BATCH)
    delta = out.outputs["delta"]
    err = (BATCH[X_TARGET] - BATCH[X_CONTROL] - delta).abs() ** 4
    direction = (BATCH[DELTA_SIGN] - torch.tanh(3.0 * delta)) ** 2
    per_cell = err.mean(1) + 0.5 * direction.mean(1)
    expected = (per_cell[:2].mean() + per_cell[2] + per_cell[3]) / 3
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_loss_genes_restrict_the_loss():
    model = _model()
    model.eval()
    batch = dict(BATCH)
    keep = torch.zeros(4, G, dtype=torch.bool)
    keep[:, :3] = True
    batch[LOSS_GENES] = keep
    changed = dict(batch)
    target = batch[X_TARGET].clone()
    target[:, 3:] += 100.0  # genes outside the loss: the loss must not see them
    changed[X_TARGET] = target
    torch.testing.assert_close(model(batch).loss, model(changed).loss)


def test_direction_term_has_a_gradient():
    """The reference's sign(y_hat - ctrl) has zero gradient; ours moves the weights."""
    grads = []
    for lam in (0.0, 1.0):
        model = _model(direction_lambda=lam)
        model(BATCH).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[1] - grads[0]).abs().max() > 1e-4


def test_group_mean_averages_cells_then_groups():
    values = torch.tensor([1.0, 3.0, 10.0, 4.0])
    assert _group_mean(values, torch.tensor([7, 7, 2, 9])).item() == pytest.approx((2 + 10 + 4) / 3)


def test_gaussian_nll_has_its_log_variance_term():
    model = _model(uncertainty=True, uncertainty_reg=1.0, direction_lambda=0.0)
    model.eval()
    out = model(BATCH)
    logvar = out.outputs["logvar"]
    err2 = (BATCH[X_TARGET] - BATCH[X_CONTROL] - out.outputs["delta"]) ** 2
    nll = 0.5 * (logvar + err2 * torch.exp(-logvar))
    expected = (nll[:2].mean(1).mean() + nll[2].mean() + nll[3].mean()) / 3
    torch.testing.assert_close(out.metrics["nll"], expected, rtol=1e-5, atol=1e-6)


def test_prediction_does_not_depend_on_batch_or_control_and_sign_matters():
    model = _model()
    model.eval()
    genes = torch.tensor([[1, 2], [3, -1], [0, -1]])
    signs = torch.tensor([[1.0, -1.0], [1.0, 0.0], [1.0, 0.0]])
    together = model.predict_delta(genes, signs)
    alone = model.predict_delta(genes[1:2], signs[1:2])
    torch.testing.assert_close(together[1:2], alone)
    flipped = model.predict_delta(genes[1:2], -signs[1:2])
    assert not torch.allclose(alone, flipped)
    order = model.predict_delta(torch.tensor([[2, 1]]), torch.tensor([[-1.0, 1.0]]))
    torch.testing.assert_close(order, together[0:1])  # a combination is a set


def test_a_lone_perturbed_cell_among_controls_trains_and_one_cell_is_refused():
    model = _model()
    mixed = _inputs([[0, -1], [-1, -1], [-1, -1]], [[1, 0], [0, 0], [0, 0]], [0, 1, 1])
    out = model(mixed)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        model(_inputs([[0, -1]], [[1, 0]], [0]))


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="hidden"):
        GEARSConfig(hidden=0)
    with pytest.raises(ConfigError, match="direction_sharpness"):
        GEARSConfig(direction_sharpness=0.0)
    with pytest.raises(ConfigError, match="'gears' model"):
        GEARSConfig(name="scgpt")
    assert np.isfinite(GEARSConfig().gamma)


def _per_cell_delta(model: GEARS, genes_BK: torch.Tensor, signs_BK: torch.Tensor) -> torch.Tensor:
    """The reference's computation: every cell's rows through plain BatchNorm (no sharing)."""
    from pertscale.models.gears import _capped

    cfg, G, H = model.cfg, model.n_genes, model.cfg.hidden
    gene = model.bn_emb(_capped(model.gene_emb.weight)).relu()
    pos = model._gnn(_capped(model.pos_emb.weight), model.coexpress_layers,
                     model.coexpress_edges, model.coexpress_weight)
    gene = model.gene_mlp(gene + cfg.pos_weight * pos)
    pert = model._gnn(_capped(model.pert_emb.weight), model.go_layers, model.go_edges,
                      model.go_weight)
    valid = genes_BK >= 0
    h = (pert[genes_BK.clamp(min=0)] * (signs_BK * valid)[..., None]).sum(1)
    B = genes_BK.shape[0]
    fused = torch.nn.Sequential(*model.pert_fuse)(h)
    base = (gene[None] + fused[:, None, :]).reshape(B * G, H)
    base = model.bn_pert_base(base).relu()
    out = (torch.nn.Sequential(*model.recovery)(base).reshape(B, G, H) * model.w1_GH).sum(-1)
    out = out + model.b1_G
    cross = torch.nn.Sequential(*model.cross_gene)(out)
    cat = torch.cat([out[..., None], cross[:, None, :].expand(B, G, H)], -1)
    return (cat * model.w2_GH1).sum(-1) + model.b2_G


def test_sharing_distinct_perturbations_equals_computing_every_cell():
    """Cells of one perturbation share their computation with count-weighted BatchNorm: the
    deltas, the gradients and the running statistics equal the per-cell computation."""
    genes = torch.tensor([[0, -1], [1, 2], [0, -1], [2, 1], [3, -1], [0, -1]])
    signs = torch.tensor([[1.0, 0], [1, -1], [1, 0], [-1, 1], [-1, 0], [1, 0]])
    shared, plain = _model(), _model()
    target = torch.randn(6, G, generator=torch.Generator().manual_seed(1))
    a = shared._heads(genes, signs)[0]
    b = _per_cell_delta(plain, genes, signs)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ((a - target) ** 2).sum().backward()
    ((b - target) ** 2).sum().backward()
    # float32 sums in a different order: gradients of size ~100 agree to ~1e-6 relative
    for (name, p), q in zip(shared.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=3e-4, msg=name)
    for (name, x), y in zip(shared.named_buffers(), plain.buffers()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
