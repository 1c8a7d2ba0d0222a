"""Perturbation-level splits: GEARS' simulation split, combination categories by how many of their
genes were seen in training, and a held-out covariate value (cell type).

A split assigns perturbed conditions to train, val and named test subgroups:
    unseen_single    single perturbations of genes never perturbed in training
    combo_seen0/1/2  combinations with 0, 1 or 2 of their genes perturbed in training
    heldout_<value>  every perturbed condition of one held-out covariate value

`simulation_split` follows GEARS' `DataSplitter.get_simulation_split` (gears/data_utils.py):
draw `train_gene_set_size` of the perturbed genes as training genes (legacy
`np.random.RandomState(seed)` on the sorted genes), singles of the other genes are
unseen_single, combinations of two training genes go to training with probability
`combo_seen2_train_frac` (the rest are combo_seen2), every other combination is combo_seen1 or
combo_seen0. The validation set is drawn the same way from the training perturbations with
fractions 0.9 / 0.9. Perturbations are identified by canonical name (genes sorted), so the
draws follow GEARS' algorithm and seeding but need not reproduce GEARS' exact lists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from pertscale.config import Config, ConfigError, check_choice, check_range
from pertscale.data.perturbation import Perturbation, PerturbationData

__all__ = [
    "SPLITS",
    "Split",
    "SplitConfig",
    "build_split",
    "heldout_covariate_split",
    "seen_category",
    "simulation_split",
]


@dataclasses.dataclass
class SplitConfig(Config):
    """Which perturbation split to evaluate on."""

    kind: str = "simulation"  # one of SPLITS: simulation | heldout_covariate
    seed: int = 1  # GEARS' default split seed
    train_gene_set_size: float = 0.75  # fraction of perturbed genes seen in training (simulation)
    combo_seen2_train_frac: float = 0.75  # share of seen-seen combinations kept for training
    heldout: str = ""  # covariate value held out (heldout_covariate)

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, SPLITS)
        check_range("train_gene_set_size", self.train_gene_set_size, 0, 1, lo_open=True,
                    hi_open=True)
        check_range("combo_seen2_train_frac", self.combo_seen2_train_frac, 0, 1)
        if self.kind == "heldout_covariate" and not self.heldout:
            raise ConfigError("heldout must name a covariate value when kind = "
                              "'heldout_covariate'")


@dataclasses.dataclass
class Split:
    """Condition ids per part of a split."""

    name: str
    train: list[str]
    val: list[str]
    test: dict[str, list[str]]

    def subgroups(self) -> dict[str, list[str]]:
        """val and every non-empty test subgroup, in a fixed order."""
        out = {name: conds for name, conds in self.test.items() if conds}
        if self.val:
            out = {"val": self.val, **out}
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def seen_category(pert: Perturbation, train_genes: set[str]) -> str:
    """unseen_single / seen_single for singles, combo_seen<k> for combinations."""
    k = sum(g in train_genes for g in pert.genes)
    if not pert.is_combo:
        return "seen_single" if k else "unseen_single"
    return f"combo_seen{k}"


def _sim_split(perts: Sequence[Perturbation], train_gene_set_size: float,
               combo_seen2_train_frac: float, seed: int):
    """GEARS' get_simulation_split on canonical perturbations -> (train, test subgroups)."""
    genes = np.unique([g for p in perts for g in p.genes])
    rng = np.random.RandomState(seed)
    train_genes = set(rng.choice(genes, int(len(genes) * train_gene_set_size), replace=False))
    groups: dict[str, list[str]] = {"unseen_single": [], "combo_seen0": [], "combo_seen1": [],
                                    "combo_seen2": []}
    train = [p.name for p in perts if not p.is_combo and p.genes[0] in train_genes]
    seen2 = []
    for p in perts:
        category = seen_category(p, train_genes)
        if category == "combo_seen2":
            seen2.append(p.name)
        elif category != "seen_single":
            groups[category].append(p.name)
    seen2 = sorted(seen2)
    rng = np.random.RandomState(seed)
    kept = (set(rng.choice(seen2, int(len(seen2) * combo_seen2_train_frac), replace=False))
            if seen2 else set())
    train += [p for p in seen2 if p in kept]
    groups["combo_seen2"] = [p for p in seen2 if p not in kept]
    return train, groups


def simulation_split(data: PerturbationData, *, seed: int = 1, train_gene_set_size: float = 0.75,
                     combo_seen2_train_frac: float = 0.75) -> Split:
    """GEARS' simulation split of the perturbed conditions (see module docstring)."""
    perts = sorted({data.conditions.at[c, "perturbation"] for c in data.perturbed})
    objs = [data.perturbations[p] for p in perts]
    treated = [p.name for p in objs if p.treatments]
    if treated:
        raise ValueError(f"a simulation split draws perturbed genes; {treated[:5]} include a "
                         f"treatment that is not a gene: use split kind = 'heldout_covariate'")
    if len({g for p in objs for g in p.genes}) < 2:
        raise ValueError("a simulation split needs perturbations of at least 2 genes")
    train, test = _sim_split(objs, train_gene_set_size, combo_seen2_train_frac, seed)
    train_objs = [data.perturbations[p] for p in sorted(train)]
    train, val = _sim_split(train_objs, 0.9, 0.9, seed)
    val_perts = {p for names in val.values() for p in names}
    by_pert: dict[str, list[str]] = {}
    for cond in data.perturbed:
        by_pert.setdefault(data.conditions.at[cond, "perturbation"], []).append(cond)

    def conds(names) -> list[str]:
        return sorted(c for p in names for c in by_pert[p])

    return Split(name=f"simulation(seed={seed})", train=conds(train), val=conds(val_perts),
                 test={k: conds(v) for k, v in test.items()})


def heldout_covariate_split(data: PerturbationData, heldout: str) -> Split:
    """Every perturbed condition of covariate value `heldout` is test; the rest is train."""
    covs = data.conditions["covariate"]
    if heldout not in set(covs):
        raise ValueError(f"held-out value {heldout!r} is not among the covariate values "
                         f"{sorted(set(covs))}")
    test = [c for c in data.perturbed if covs[c] == heldout]
    train = [c for c in data.perturbed if covs[c] != heldout]
    if not test or not train:
        raise ValueError(f"holding out {heldout!r} leaves {len(train)} training and "
                         f"{len(test)} test conditions; both must be non-empty")
    return Split(name=f"heldout({heldout})", train=train, val=[],
                 test={f"heldout_{heldout}": test})


SPLITS = ("simulation", "heldout_covariate")


def build_split(data: PerturbationData, cfg: SplitConfig) -> Split:
    if cfg.kind == "simulation":
        return simulation_split(data, seed=cfg.seed, train_gene_set_size=cfg.train_gene_set_size,
                                combo_seen2_train_frac=cfg.combo_seen2_train_frac)
    return heldout_covariate_split(data, cfg.heldout)
