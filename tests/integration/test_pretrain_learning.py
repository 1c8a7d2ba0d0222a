"""`pertscale pretrain` from the command line learns: after pretraining the debug scGPT on
simulated cells (gene programs give co-expression), held-out cells' masked values are
predicted far better than by each gene's mean bin over the training cells."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pertscale.constants import CU_SEQLENS, GENE_IDS, MASKED, TARGET_VALUES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
N_GENES, N_TRAIN, N_HELDOUT = 60, 3000, 400
STEPS = 400


def _write_store(uri: str, blocks, var) -> None:
    from pertscale.store import StoreWriter

    with StoreWriter(uri, var=var, raw_counts=True,
                     source={"file": "simulated", "sha256": "-"}) as w:
        for x, obs in blocks:
            w.append(x, obs)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[str, str]:
    """Train and held-out stores: disjoint cells of one simulated screen."""
    from pertscale.data.synthetic import SimulatorConfig, build_ground_truth, simulate_blocks

    # NOTE: two strong gene programs (program activity sd 2, deep libraries) make the
    # co-expression that masked-value modelling must pick up within a few hundred CPU steps; a
    # ridge regression on the other genes' bins reaches ~0.45x the per-gene-mean error here.
    cfg = SimulatorConfig(n_genes=N_GENES, n_cells=N_TRAIN + N_HELDOUT,
                          n_single_perturbations=10, n_double_perturbations=2, n_programs=2,
                          program_activity_sd=2.0, library_size_median=5000.0, seed=11)
    truth = build_ground_truth(cfg)
    blocks = list(simulate_blocks(cfg, N_HELDOUT, truth=truth))
    root = tmp_path_factory.mktemp("stores")
    train, heldout = str(root / "train"), str(root / "heldout")
    _write_store(train, blocks[:-1], truth.var())
    _write_store(heldout, blocks[-1:], truth.var())
    return train, heldout


def _token_batches(store_uri: str, tokenizer_cfg, n_batches: int | None = None):
    from pertscale.data.loader import CellLoader
    from pertscale.data.tokenizer import Tokenizer

    loader = CellLoader(store_uri, batch_size=100, seed=5)
    tokenizer = Tokenizer(tokenizer_cfg, loader.store.vocab)
    generator = torch.Generator().manual_seed(123)
    for i, batch in enumerate(loader):
        if n_batches is not None and i >= n_batches:
            break
        yield tokenizer(batch, layout="packed", generator=generator)


def test_pretrain_cli_learns_masked_values(stores, storage_dir):
    from pertscale.data.tokenizer import TokenizerConfig
    from pertscale.models.scgpt import ScGPTConfig, build_scgpt
    from pertscale.tracking.registry import load_model_dir

    train, heldout = stores
    env = {**os.environ, "PERTSCALE_STORAGE": str(storage_dir), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "pertscale", "pretrain",
           "--config", str(REPO_ROOT / "configs" / "scgpt_debug.toml"),
           f"--data.store_uri={train}", f"--trainer.max_steps={STEPS}", "--engine.lr=3e-3",
           "--no-progress", "--alias", "learned"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["step"] == STEPS and summary["model_uri"] == "models:/pertscale-scgpt/1"
    from pertscale.tracking import pull_model

    pulled = pull_model("models:/pertscale-scgpt@learned")
    assert pulled.version == "1" and pulled.tags["store_fingerprint"]

    exported = load_model_dir(Path(summary["checkpoint"]) / "model")
    state_dict, config, vocab = exported.tensors, exported.config, exported.vocab
    model = build_scgpt(ScGPTConfig.from_dict(config["model_config"]), vocab)
    model.load_state_dict(state_dict)
    model.eval()
    tok_cfg = TokenizerConfig.from_dict(config["tokenizer"])

    # per-gene mean bin over the training cells' expressed genes (the baseline)
    sums, counts = np.zeros(len(vocab)), np.zeros(len(vocab))
    for tokens in _token_batches(train, tok_cfg, n_batches=10):
        genes = tokens[GENE_IDS].numpy()
        is_gene = genes >= 3
        np.add.at(sums, genes[is_gene], tokens[TARGET_VALUES].numpy()[is_gene])
        np.add.at(counts, genes[is_gene], 1)
    gene_mean = sums / np.maximum(counts, 1)

    se_model = se_mean = n = 0.0
    with torch.no_grad():
        for tokens in _token_batches(heldout, tok_cfg):
            assert CU_SEQLENS in tokens
            pred = model(tokens).outputs["predictions"]
            masked = tokens[MASKED]
            target = tokens[TARGET_VALUES][masked].numpy()
            se_model += float(((pred[masked].numpy() - target) ** 2).sum())
            se_mean += float(((gene_mean[tokens[GENE_IDS][masked].numpy()] - target) ** 2).sum())
            n += len(target)
    mse_model, mse_mean = se_model / n, se_mean / n
    print(f"held-out masked-value MSE: model {mse_model:.2f}, per-gene mean {mse_mean:.2f}")
    assert mse_model < 0.8 * mse_mean
