"""The paired task: each training perturbed cell once per epoch, paired with a seeded control of
its own covariate, equal disjoint shares per rank, exact resume; and the task context."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pertscale.constants import (
    CELL_INDEX,
    CONDITION,
    CONTROL_INDEX,
    CONTROL_MEAN,
    LOSS_GENES,
    PERT_GENES,
    X_CONTROL,
    X_TARGET,
)
from pertscale.data.paired import (
    PairedDataConfig,
    PairedInputs,
    PairedLoader,
    PairedTask,
    build_paired_context,
    holdout_rows,
    read_dense_rows,
)
from pertscale.data.perturbation import PerturbationConfig, load_perturbation_data
from pertscale.data.splits import simulation_split

PCFG = PerturbationConfig(covariate_column="cell_type", sign_column="perturbation_type",
                          sign_values={"control": 1, "activation": 1, "inhibition": -1})


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from pertscale.data.synthetic import SimulatorConfig, write_dataset
    from pertscale.store import open_store

    out = tmp_path_factory.mktemp("paired")
    cfg = SimulatorConfig(n_genes=60, n_cells=1200, n_cell_types=2, n_batches=1,
                          n_single_perturbations=12, n_double_perturbations=4, seed=3)
    write_dataset(cfg, out / "files", store_uri=str(out / "store"))
    store = open_store(str(out / "store"))
    data = load_perturbation_data(store, PCFG)
    split = simulation_split(data, seed=1)
    dcfg = PairedDataConfig(store_uri=str(out / "store"), perturbation=PCFG, batch_size=8)
    return {"store": store, "data": data, "split": split, "cfg": dcfg}


def _epoch(loader):
    return [dict(b) for b in loader]


def test_batches_pair_training_cells_with_controls_of_their_covariate(sim):
    store, split, data = sim["store"], sim["split"], sim["data"]
    loader = PairedLoader(sim["cfg"], split.train)
    obs = store.obs
    seen = []
    for batch in loader:
        rows, ctrl, cond = batch[CELL_INDEX], batch[CONTROL_INDEX], batch[CONDITION]
        names = [split.train[c] for c in cond]
        for r, c, name in zip(rows, ctrl, names):
            assert str(obs["cell_type"].iloc[r]) == data.conditions.at[name, "covariate"]
            assert str(obs["cell_type"].iloc[c]) == data.conditions.at[name, "covariate"]
            assert str(obs["perturbation"].iloc[c]) in PCFG.control_labels
        np.testing.assert_allclose(batch[X_TARGET], read_dense_rows(
            store, rows, log_normalise=True, target_sum=1e4), rtol=1e-6)
        np.testing.assert_allclose(batch[X_CONTROL], read_dense_rows(
            store, ctrl, log_normalise=True, target_sum=1e4), rtol=1e-6)
        seen.extend(rows.tolist())
    n_train = int(data.conditions.loc[split.train, "n_cells"].sum())
    assert loader.num_train_cells == n_train
    assert len(seen) == len(set(seen)) == loader.num_batches * 8
    assert n_train - len(seen) < 8  # only the remainder that fills no batch is left out


def test_held_out_cells_are_a_seeded_share_of_each_condition_and_never_drawn(sim):
    store, split, data = sim["store"], sim["split"], sim["data"]
    codes, table = PairedTask(store, data, split, sim["cfg"]).cell_conditions()
    ctrl = table.index[table["is_control"]]
    conds = [table.index.get_loc(c) for c in [*split.train, *ctrl]]
    held = holdout_rows(codes, conds, 0.1, 10_000, seed=0)
    for c in conds:  # a tenth of each condition, rounded down
        assert np.isin(held, np.flatnonzero(codes == c)).sum() == int(0.1 * (codes == c).sum())
    np.testing.assert_array_equal(held, holdout_rows(codes, conds, 0.1, 10_000, seed=0))
    assert not np.array_equal(held, holdout_rows(codes, conds, 0.1, 10_000, seed=1))
    capped = holdout_rows(codes, conds, 0.1, 20, seed=0)
    assert 0 < capped.size <= 20

    loader = PairedLoader(sim["cfg"], split.train, holdout=held)
    n_train = int(data.conditions.loc[split.train, "n_cells"].sum())
    assert loader.num_train_cells == n_train - np.isin(codes[held], conds[:len(split.train)]).sum()
    drawn = np.concatenate([np.r_[b[CELL_INDEX], b[CONTROL_INDEX]] for b in loader])
    assert not np.isin(drawn, held).any()  # neither as a target nor as a control


def test_read_dense_rows_matches_log_normalised_csr(sim):
    store = sim["store"]
    rows = np.array([5, 3, 3, 100, 4])
    x = store.read_csr(0, 200).toarray().astype(np.float64)
    expect = np.log1p(x / x.sum(1, keepdims=True) * 1e4)[rows]
    np.testing.assert_allclose(read_dense_rows(store, rows, log_normalise=True, target_sum=1e4),
                               expect, rtol=1e-5)


def test_ranks_are_disjoint_equal_and_epochs_differ(sim):
    split = sim["split"]
    ranks = [PairedLoader(sim["cfg"], split.train, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].num_batches == ranks[1].num_batches
    cells = [np.concatenate([b[CELL_INDEX] for b in loader]) for loader in ranks]
    assert not set(cells[0]) & set(cells[1])
    second = np.concatenate([b[CELL_INDEX] for b in ranks[0]])  # the next epoch
    assert not np.array_equal(second, cells[0])


def test_resume_yields_exactly_the_uninterrupted_stream(sim):
    split = sim["split"]
    full = PairedLoader(sim["cfg"], split.train)
    expected = _epoch(full) + _epoch(full)
    first = PairedLoader(sim["cfg"], split.train)
    it = iter(first)
    got = [next(it) for _ in range(3)]
    state = first.state_dict()
    resumed = PairedLoader(sim["cfg"], split.train)
    resumed.load_state_dict(state)
    got += _epoch(resumed) + _epoch(resumed)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for key in (CELL_INDEX, CONTROL_INDEX, CONDITION):
            np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[X_TARGET], b[X_TARGET])
    other = PairedLoader(sim["cfg"].replace(seed=9), split.train)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_context_and_inputs(sim):
    task = PairedTask(sim["store"], sim["data"], sim["split"], sim["cfg"])
    data, split = sim["data"], sim["split"]
    context = build_paired_context(task, task.perturbed_genes)
    cond = split.train[0]
    np.testing.assert_array_equal(context["train"]["loss_genes"][0], data.mean(cond) != 0)
    assert context["val"]["delta"].shape == (len(split.val), len(data.genes))
    loader = PairedLoader(sim["cfg"], split.train)
    batch = next(iter(loader))
    inputs = PairedInputs(context)(batch)
    c = int(batch[CONDITION][0])
    name = split.train[c]
    genes = [task.perturbed_genes[i] for i in inputs[PERT_GENES][0].tolist() if i >= 0]
    assert tuple(genes) == data.perturbation(name).genes
    torch.testing.assert_close(inputs[CONTROL_MEAN][0], torch.as_tensor(
        data.ctrl_mean(name), dtype=torch.float32))
    assert inputs[LOSS_GENES].dtype == torch.bool
    with pytest.raises(ValueError, match="not in the model's perturbation table"):
        build_paired_context(task, task.perturbed_genes[1:])
