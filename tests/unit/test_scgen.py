"""scgen's pathway_vae encoder: a cell gets the latent its registered pathway_vae gives it (genes
matched by id or symbol, in any order, unknown ones left out), the packing keeps a long cell's
highest values, and the encoder cannot be asked for without a pathway_vae to take it from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pertscale.config import ConfigError
from pertscale.data.pathways import PathwaySelection
from pertscale.models.pathway_vae import (
    PathwayVAEConfig,
    PathwayVAEEmbedder,
    build_pathway_vae,
    export_pathway_vae,
)
from pertscale.models.scgen import ScGenConfig, _init_from, build_scgen
from pertscale.models.spec import get_spec

N_GENES = 30
SYMBOLS = [f"G{i}" for i in range(N_GENES)]
VOCAB = ["<pad>", "<cls>", "<mask>", *[f"ENSG{i}" for i in range(N_GENES)]]
SELECTION = PathwaySelection(term_ids=["GO:1", "GO:2"], names=["a", "b"],
                             genes=[[f"G{i}" for i in range(12)],
                                    [f"G{i}" for i in range(10, 24)]],
                             report=[("rule", 0, 2)])


def _parent(max_seq_len: int = 64):
    torch.manual_seed(0)
    cfg = PathwayVAEConfig(attention="reference", d_model=16, n_heads=2, d_ff=32, latent_dim=4,
                           decoder_hidden=16, max_seq_len=max_seq_len)
    context = {"vocab": VOCAB, "gene_symbols": SYMBOLS, "pathways": SELECTION.to_dict(),
               "likelihood": "gaussian", "raw_counts": False}
    model = build_pathway_vae(cfg, context)
    return export_pathway_vae(cfg, model.state_dict(), {"context": context, "vocab": VOCAB})


class _Data:
    # the task's genes: a shuffled subset of the parent's, by id or by symbol, and two it lacks
    order = np.random.default_rng(1).permutation(N_GENES)[:24]
    genes = [f"ENSG{i}" if i % 2 else f"other{i}" for i in order] + ["NEW1", "NEW2"]
    symbols = [f"G{i}" for i in order] + ["N1", "N2"]


def _scgen(exported):
    cfg = ScGenConfig(hidden=16, latent_dim=100, encoder="pathway_vae")
    values, _, report = _init_from(cfg, get_spec("pathway_vae"), exported, _Data)
    assert report["init_genes_matched"] == "24/26"
    context = {"genes": _Data.genes, "symbols": _Data.symbols,
               "init_parent": {"kind": "pathway_vae", "config": exported.config,
                               "vocab": exported.vocab}}
    module = build_scgen(cfg, context)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)
    return module.eval()


def _cells(n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(2)
    counts = rng.poisson(rng.gamma(0.5, 2.0, (n, len(_Data.genes))))
    # continuous values (normalised by the cell's total): no ties among a cell's genes
    x = np.log1p(counts * rng.uniform(0.9, 1.1, counts.shape)).astype(np.float32)
    x[2] = 0  # a cell with no expressed gene
    return x


def test_pathway_encoder_gives_a_cell_its_pathway_vae_latent():
    exported = _parent()
    module = _scgen(exported)
    assert module.q.latent_dim == 4  # the pathway_vae's latent, not model.latent_dim
    x = _cells()
    z = module.latent(torch.as_tensor(x)).numpy()
    embedder = PathwayVAEEmbedder(exported)
    expect = embedder.embed(x[:, :24], _Data.symbols[:24])
    np.testing.assert_allclose(z, expect, rtol=1e-5, atol=1e-6)


def test_pathway_encoder_keeps_a_long_cells_highest_values():
    exported = _parent(max_seq_len=6)
    module = _scgen(exported)
    x = _cells()
    z = module.latent(torch.as_tensor(x)).numpy()
    top = np.where(x[:, :24] >= np.sort(x[:, :24], axis=1)[:, [-5]], x[:, :24], 0.0)
    assert ((top > 0).sum(1) <= 5).all()  # continuous values: no ties
    expect = PathwayVAEEmbedder(exported).embed(top, _Data.symbols[:24])
    np.testing.assert_allclose(z, expect, rtol=1e-5, atol=1e-6)


def test_pathway_encoder_needs_a_registered_pathway_vae():
    cfg = ScGenConfig(hidden=16, encoder="pathway_vae")
    with pytest.raises(ConfigError, match="init_from"):
        build_scgen(cfg, {"genes": _Data.genes, "symbols": _Data.symbols})
    with pytest.raises(ValueError, match="model.encoder='mlp'"):
        _init_from(ScGenConfig(), get_spec("pathway_vae"), _parent(), _Data)
    with pytest.raises(ValueError, match="none of the store's"):
        class Unknown:
            genes, symbols = ["A", "B"], ["A", "B"]
        _init_from(cfg, get_spec("pathway_vae"), _parent(), Unknown)
