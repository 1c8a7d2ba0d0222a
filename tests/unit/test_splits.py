"""Perturbation splits: GEARS simulation categories, seeding, held-out covariate."""

import itertools

import pytest
from test_baselines import make_data  # tests/unit is on sys.path (rootdir-less prepend import)

from pertscale.config import ConfigError
from pertscale.data.splits import SplitConfig, build_split, seen_category, simulation_split

GENES = [f"G{i}" for i in range(20)]
COMBOS = [f"{a}+{b}" for a, b in itertools.combinations(GENES[:12], 2)][:30]


@pytest.fixture
def data():
    return make_data({"k562": GENES + COMBOS, "hepg2": GENES[:10]})


def _train_genes(data, split):
    return {g for c in split.train for g in data.perturbation(c).genes
            if not data.perturbation(c).is_combo}


def test_simulation_split_categories(data):
    split = simulation_split(data, seed=1)
    parts = [split.train, split.val, *split.test.values()]
    everything = [c for part in parts for c in part]
    assert sorted(everything) == sorted(data.perturbed)  # a partition of the conditions
    seen = {g for c in split.train + split.val for g in data.perturbation(c).genes}
    for group, conds in split.test.items():
        for c in conds:
            assert seen_category(data.perturbation(c), seen) == group
    assert len(split.test["unseen_single"]) > 0 and len(split.test["combo_seen2"]) > 0
    # one perturbation's conditions in both cell types stay on one side
    for part in parts:
        perts = {data.conditions.at[c, "perturbation"] for c in part}
        for p in perts:
            assert all(c in part for c in data.perturbed
                       if data.conditions.at[c, "perturbation"] == p)


def test_simulation_split_is_seeded(data):
    assert simulation_split(data, seed=3) == simulation_split(data, seed=3)
    assert simulation_split(data, seed=3).test != simulation_split(data, seed=4).test


def test_train_gene_fraction(data):
    split = simulation_split(data, seed=1, train_gene_set_size=0.5)
    unseen = {data.perturbation(c).genes[0] for c in split.test["unseen_single"]}
    assert len(unseen) == 10  # 20 genes, half drawn for training


def test_heldout_covariate_split(data):
    split = build_split(data, SplitConfig(kind="heldout_covariate", heldout="hepg2"))
    assert split.test == {"heldout_hepg2": [c for c in data.perturbed if c.startswith("hepg2/")]}
    assert not any(c.startswith("hepg2/") for c in split.train)
    with pytest.raises(ValueError, match=r"'liver' is not among .*\['hepg2', 'k562'\]"):
        build_split(data, SplitConfig(kind="heldout_covariate", heldout="liver"))


def test_split_config_errors():
    with pytest.raises(ConfigError, match="kind='random'"):
        SplitConfig(kind="random")
    with pytest.raises(ConfigError, match="heldout"):
        SplitConfig(kind="heldout_covariate")
