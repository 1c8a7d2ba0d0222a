"""pathway_vae learns pathway activities: on simulated cells whose gene programs are the GO-like
pathways, the learned activity of each program's pathway follows the cell's true (latent)
program activity on held-out cells, clearly better than the same model trained with a
shuffled mask (every pathway's genes replaced by random genes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_TRAIN, N_HELDOUT, STEPS = 3000, 600, 250


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> dict:
    from pertscale.data.synthetic import (
        SimulatorConfig,
        build_design,
        build_ground_truth,
        program_activity,
        simulate_blocks,
        write_dataset,
    )
    from pertscale.store import StoreWriter

    cfg = SimulatorConfig(n_genes=300, n_cells=N_TRAIN + N_HELDOUT, n_programs=8,
                          n_cell_types=2, n_batches=1, n_single_perturbations=12,
                          n_double_perturbations=0, program_activity_sd=0.6, seed=7)
    root = tmp_path_factory.mktemp("screen")
    write_dataset(cfg, root / "files")  # the gene sets (GMT) and the GO DAG
    truth = build_ground_truth(cfg)
    stores = {"train": str(root / "train"), "heldout": str(root / "heldout")}
    blocks = list(simulate_blocks(cfg, N_HELDOUT, truth=truth))
    for name, part in (("train", blocks[:-1]), ("heldout", blocks[-1:])):
        with StoreWriter(stores[name], var=truth.var(), raw_counts=True,
                         source={"file": "simulated", "sha256": "-"}) as w:
            for x, obs in part:
                w.append(x, obs)
    activity = program_activity(cfg, build_design(cfg, truth))[N_TRAIN:]
    return {"files": root / "files", "truth": truth, "activity": activity, **stores}


def _program_of_pathways(selection, symbols, truth) -> list[int]:
    """The program whose genes make up most of each pathway (-1: none has a majority)."""
    program = dict(zip(symbols, truth.program))
    out = []
    for genes in selection.genes:
        ks = np.array([program[g] for g in genes])
        counts = np.bincount(ks[ks >= 0], minlength=truth.program.max() + 1)
        out.append(int(counts.argmax()) if counts.max() > len(ks) / 2 else -1)
    return out


def _train_and_correlate(screen, selection, symbols, programs) -> np.ndarray:
    """|Pearson| between each program pathway's learned activity and the true program
    activity, over the held-out cells."""
    from pertscale.constants import CELL_INDEX, INDICES, INDPTR, VALUES
    from pertscale.data.expression import ExpressionInputs
    from pertscale.data.loader import CellLoader
    from pertscale.models.pathway_vae import PathwayVAEConfig, build_pathway_vae
    from pertscale.store import open_store

    train = open_store(screen["train"])
    context = {"vocab": train.vocab.tokens, "gene_symbols": symbols,
               "pathways": selection.to_dict(), "likelihood": "nb"}
    torch.manual_seed(0)
    model = build_pathway_vae(PathwayVAEConfig(), context)  # the debug size
    inputs = ExpressionInputs(len(symbols), raw_counts=True, target="counts", max_seq_len=1024)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loader = CellLoader(screen["train"], batch_size=64, block_size=64, seed=0)
    generator = torch.Generator().manual_seed(0)
    step = 0
    while step < STEPS:
        for batch in loader:
            out = model(inputs(batch, generator))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            step += 1
            if step == STEPS:
                break
    model.eval()
    x = open_store(screen["heldout"]).read_csr(0, N_HELDOUT)
    batch = {INDPTR: x.indptr.astype(np.int64), INDICES: x.indices, VALUES: x.data,
             CELL_INDEX: np.arange(N_HELDOUT)}
    with torch.no_grad():
        act = model(inputs(batch, generator)).outputs["activities"].numpy()
    return np.array([abs(np.corrcoef(act[:, p], screen["activity"][:, k])[0, 1])
                     for p, k in enumerate(programs) if k >= 0])


def test_pathway_activities_follow_true_programs_better_than_a_shuffled_mask(screen):
    from pertscale.data.pathways import (
        PathwaySelection,
        PathwaySelectionConfig,
        select_pathways,
    )
    from pertscale.store import open_store

    symbols = open_store(screen["train"]).var["gene_symbol"].astype(str).tolist()
    selection = select_pathways(PathwaySelectionConfig(
        gmt=str(screen["files"] / "gene_sets.gmt"),
        dag_edges=str(screen["files"] / "go_dag_edges.tsv"), max_genes=40), symbols)
    programs = _program_of_pathways(selection, symbols, screen["truth"])
    assert sum(k >= 0 for k in programs) >= 6  # most programs have their pathway token
    rng = np.random.default_rng(1)
    relabel = dict(zip(symbols, rng.permutation(symbols)))
    shuffled = PathwaySelection(selection.term_ids, selection.names,
                                [sorted(relabel[g] for g in genes) for genes in selection.genes],
                                selection.report)
    learned = _train_and_correlate(screen, selection, symbols, programs)
    baseline = _train_and_correlate(screen, shuffled, symbols, programs)
    print(f"mean |r| with the program activity: GO mask {learned.mean():.3f} "
          f"(min {learned.min():.3f}), shuffled mask {baseline.mean():.3f} "
          f"(min {baseline.min():.3f})")
    assert learned.mean() >= 0.3
    assert learned.mean() >= baseline.mean() + 0.2
