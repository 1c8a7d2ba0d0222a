"""scgpt_perturb's own parts: a flag per gene token with the perturbation's direction, the step's
gene tokens always holding the perturbed genes, the mean change predicted on the control pool,
and what init_from refuses."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from pertscale.constants import CONDITION, GENE_IDS, PERT_GENES, X_CONTROL, X_TARGET
from pertscale.models import get_spec
from pertscale.models.scgpt_perturb import (
    FLAG_DOWN,
    FLAG_NONE,
    FLAG_UP,
    ScGPTPerturb,
    ScGPTPerturbConfig,
    ScGPTPerturbInputs,
)

G = 12


def _model(**kw) -> ScGPTPerturb:
    torch.manual_seed(0)
    pool = torch.rand(2, 3, G)
    return ScGPTPerturb(ScGPTPerturbConfig(**kw), G, pool).eval()


def test_each_perturbed_gene_token_carries_its_direction():
    model = _model()
    genes = torch.tensor([[3, 7], [5, -1]])
    signs = torch.tensor([[1.0, -1.0], [-1.0, 0.0]])
    tokens = torch.tensor([1, 3, 5, 9])  # gene 7 is not among this step's tokens
    flags = model._flags(genes, signs, tokens)
    assert flags.tolist() == [[FLAG_NONE, FLAG_UP, FLAG_NONE, FLAG_NONE],
                              [FLAG_NONE, FLAG_NONE, FLAG_DOWN, FLAG_NONE]]


def test_predicted_change_depends_on_gene_and_direction_and_pool():
    model = _model()
    genes = torch.tensor([[4], [4], [6], [4]])
    signs = torch.tensor([[1.0], [-1.0], [1.0], [1.0]])
    cov = torch.tensor([0, 0, 0, 1])
    delta = model.predict_delta(genes, signs, cov)
    assert delta.shape == (4, G)
    for a, b in [(0, 1), (0, 2), (0, 3)]:  # direction, gene, covariate's control pool
        assert not torch.allclose(delta[a], delta[b])
    # the change is the mean predicted cell minus the mean pool cell
    pool = model.control_pool[0]
    flags = model._flags(genes[:1].repeat(3, 1), signs[:1].repeat(3, 1), torch.arange(G))
    pred = model._expression(torch.arange(G), pool, flags)
    torch.testing.assert_close(delta[0], (pred - pool).mean(0))


def test_step_tokens_keep_the_perturbed_genes_when_subsampling():
    context = {"genes": [f"g{i}" for i in range(G)], "control_mean": np.zeros((1, G), np.float32),
               "train": {"pert_genes": np.array([[10, 2], [11, -1]]),
                         "pert_signs": np.array([[1.0, 1.0], [-1.0, 0.0]], dtype=np.float32),
                         "loss_genes": np.ones((2, G), bool),
                         "delta_sign": np.zeros((2, G), np.int8),
                         "covariate": np.zeros(2, np.int64)}}
    inputs = ScGPTPerturbInputs(ScGPTPerturbConfig(max_seq_len=5), context)
    batch = {CONDITION: np.array([0, 1, 1]), X_CONTROL: np.zeros((3, G), np.float32),
             X_TARGET: np.zeros((3, G), np.float32)}
    seen = set()
    for seed in range(6):
        ids = inputs(batch, torch.Generator().manual_seed(seed))[GENE_IDS]
        assert ids.numel() == 5 and {2, 10, 11} <= set(ids.tolist())
        assert ids.tolist() == sorted(set(ids.tolist()))
        seen.add(tuple(ids.tolist()))
    assert len(seen) > 1  # the other tokens are drawn by the step's generator
    full = ScGPTPerturbInputs(ScGPTPerturbConfig(max_seq_len=G), context)(batch)
    assert full[GENE_IDS].tolist() == list(range(G)) and full[PERT_GENES].shape == (3, 2)


def test_init_from_refuses_another_model_or_another_size():
    spec = get_spec("scgpt_perturb")
    data = types.SimpleNamespace(genes=["a"], symbols=["A"])
    parent = types.SimpleNamespace(config={"model_config": {"name": "scgpt", "flavor": "debug",
                                                            "d_model": 32}},
                                   tensors={}, vocab=[])
    with pytest.raises(ValueError, match="not a gears"):
        spec.init_from(ScGPTPerturbConfig(), get_spec("gears"), parent, data)
    with pytest.raises(ValueError, match="parent scgpt has size"):
        spec.init_from(ScGPTPerturbConfig(), get_spec("scgpt"), parent, data)
