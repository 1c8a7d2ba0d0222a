"""PairedLoader: perturbed cells, each paired with a seeded random control cell of its covariate
(the "paired" task of fine-tuning, as GEARS pairs a perturbed cell with a random control of its
cell type), in distributed, resumable minibatches.

Plan (pure index math on obs; deterministic in (seed, epoch), the same on every rank):
1. The training cells are the store's cells whose condition (perturbation in covariate, read as
   `pertscale.data.perturbation` reads it) is one of `conditions`, in store order, less the
   `holdout` rows (cells a model validates on, e.g. scGen's early-stopping cells: never drawn,
   as a target or as a control).
2. Each epoch they are put in a random order seeded by (seed, epoch) and dealt to the ranks in
   equal shares; rank r's batch b is its share's cells [b*B, (b+1)*B) (the remainder that does
   not fill a batch on every rank is left out of that epoch, a different set every epoch).
3. Batch b pairs each of its cells with a control cell of the cell's covariate, drawn uniformly
   by a generator seeded by (seed, epoch, rank, b): a batch depends on nothing else, so a
   loader resumed at (epoch, batch) yields exactly what an uninterrupted one would have.

Batches follow the paired contract in `pertscale.constants`: CELL_INDEX, CONTROL_INDEX,
CONDITION (row of `conditions`), X_TARGET and X_CONTROL as dense float32 [B, G] on the log1p
scale (raw counts are scaled per cell to `target_sum`, as pseudo-bulk means are). Rows are read
as contiguous runs through `read_csr_async` (all runs of a batch in flight at once), and a
background thread assembles `prefetch_batches` batches ahead. Memory: two int64 arrays over the
store's cells (condition codes, training rows) plus the queued batches, whatever the store size.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from pertscale.config import Config, check_range
from pertscale.constants import (
    CELL_INDEX,
    CONDITION,
    CONTROL_INDEX,
    CONTROL_MEAN,
    DELTA_SIGN,
    LOSS_GENES,
    PERT_GENES,
    PERT_SIGNS,
    X_CONTROL,
    X_TARGET,
)
from pertscale.data.perturbation import (
    PerturbationConfig,
    PerturbationData,
    _group_cells,
    normalise_counts,
)
from pertscale.data.splits import Split, SplitConfig
from pertscale.models.spec import encode_perturbations

__all__ = [
    "LossValidation",
    "PairedDataConfig",
    "PairedInputs",
    "PairedLoader",
    "PairedTask",
    "PairedValidation",
    "build_paired_context",
    "control_rows",
    "holdout_rows",
    "read_dense_rows",
]

_STATE_KEYS = ("rank", "world_size", "seed", "batch_size", "n_cells", "n_train")


@dataclasses.dataclass
class PairedDataConfig(Config):
    """The store a fine-tune reads, its perturbations, the split, and the paired batches."""

    store_uri: str = ""  # cell store path or s3:// / gs:// URI (required at run time)
    perturbation: PerturbationConfig = dataclasses.field(default_factory=PerturbationConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    batch_size: int = 32  # perturbed cells per batch (per rank; GEARS: 32)
    seed: int = 0  # seed of the cell order and of the control pairing
    prefetch_batches: int = 4  # batches assembled ahead of the consumer

    def __post_init__(self) -> None:
        check_range("batch_size", self.batch_size, 1)
        check_range("seed", self.seed, 0)
        check_range("prefetch_batches", self.prefetch_batches, 1)


def read_dense_rows(src: Any, rows: np.ndarray, *, log_normalise: bool,
                    target_sum: float) -> np.ndarray:
    """float32 [len(rows), G]: the store rows `rows` (any order, repeats allowed), each read once
    as part of a contiguous run, optionally scaled to `target_sum` per cell and log1p'd."""
    uniq, inverse = np.unique(rows, return_inverse=True)
    runs = np.split(uniq, np.flatnonzero(np.diff(uniq) != 1) + 1)
    futures = [src.read_csr_async(int(r[0]), int(r[-1]) + 1) for r in runs]
    x = sp.vstack([f.result() for f in futures], format="csr", dtype=np.float32)
    if log_normalise:
        x = normalise_counts(x, target_sum, uniq)
    return x.toarray()[inverse]


def control_rows(codes: np.ndarray, table: Any, covariates: Sequence[str],
                 holdout: np.ndarray | None = None) -> list[np.ndarray]:
    """Store rows of the control cells of each covariate (codes and table: `_group_cells`),
    less the `holdout` rows."""
    out = []
    for cov in covariates:
        ctrl = table.index[(table["covariate"] == cov) & table["is_control"]]
        rows = np.flatnonzero(codes == table.index.get_loc(ctrl[0]))
        if holdout is not None and len(holdout):
            rows = rows[~np.isin(rows, holdout)]
        if rows.size == 0:
            raise ValueError(f"covariate {cov!r} has no control cell left after the holdout")
        out.append(rows)
    return out


def holdout_rows(codes: np.ndarray, conditions: Sequence[int], fraction: float,
                 max_cells: int, seed: int) -> np.ndarray:
    """Sorted store rows of a seeded held-out sample: `fraction` of the cells of each condition
    code in `conditions` (rounded down, so a condition keeps at least one cell), the total
    capped at `max_cells` by scaling every condition's share alike."""
    groups = [np.flatnonzero(codes == c) for c in conditions]
    total = sum(int(fraction * g.size) for g in groups)
    scale = min(1.0, max_cells / total) if total else 1.0
    rng = np.random.default_rng([seed, 13])
    picks = [rng.choice(g, int(int(fraction * g.size) * scale), replace=False) for g in groups]
    return np.sort(np.concatenate(picks or [np.zeros(0, np.int64)])).astype(np.int64)


class PairedLoader:
    """Iterable of paired batches for one rank (module doc); `num_batches` per epoch."""

    def __init__(self, cfg: PairedDataConfig, conditions: Sequence[str], *, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, store: Any = None,
                 holdout: np.ndarray | None = None) -> None:
        from pertscale.store import open_store

        if not cfg.store_uri and store is None:
            raise ValueError("data.store_uri is empty: name the store to fine-tune on")
        self.cfg, self.rank, self.world_size = cfg, int(rank), int(world_size)
        self.store = store if store is not None else open_store(cfg.store_uri)
        codes, table, _, _ = _group_cells(self.store.obs, cfg.perturbation, self.store.uri)
        unknown = sorted(set(conditions) - set(table.index))
        if unknown:
            raise ValueError(f"store {self.store.uri} has no cells of condition(s) {unknown[:5]}")
        self.conditions = list(conditions)
        position = {c: i for i, c in enumerate(self.conditions)}
        # condition code of the store's table -> row of `conditions` (-1: not trained on)
        remap = np.array([position.get(c, -1) for c in table.index], dtype=np.int64)
        cell_condition = np.where(codes >= 0, remap[np.maximum(codes, 0)], -1)
        if holdout is not None and len(holdout):
            cell_condition[np.asarray(holdout, dtype=np.int64)] = -1
        self._train_rows = np.flatnonzero(cell_condition >= 0).astype(np.int64)
        self._train_condition = cell_condition[self._train_rows]
        # controls of each covariate, and the covariate of each training condition
        covariates = sorted(set(table["covariate"]))
        cov_pos = {c: i for i, c in enumerate(covariates)}
        self._controls = control_rows(codes, table, covariates, holdout)
        self._cond_cov = np.array([cov_pos[table.at[c, "covariate"]] for c in self.conditions],
                                  dtype=np.int64)
        self.covariates = covariates
        self._log_normalise = bool(self.store.raw_counts)
        self._epoch, self._batches_emitted = int(epoch), 0

    # --- plan -------------------------------------------------------------------------------
    @property
    def num_train_cells(self) -> int:
        return int(self._train_rows.size)

    @property
    def num_batches(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.num_train_cells // self.world_size // self.cfg.batch_size

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def at_epoch_end(self) -> bool:
        """True once the last batch of the current epoch was handed out."""
        return self._batches_emitted >= self.num_batches

    def __len__(self) -> int:
        return self.num_batches

    def plan(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(perturbed rows, control rows, condition) of batch `batch` of `epoch` on this rank."""
        n, bs = self.num_train_cells, self.cfg.batch_size
        share = n // self.world_size
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
        picks = order[self.rank * share + batch * bs: self.rank * share + (batch + 1) * bs]
        rows, cond = self._train_rows[picks], self._train_condition[picks]
        rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, batch])
        controls = np.empty_like(rows)
        for cov in np.unique(self._cond_cov[cond]):
            mine = np.flatnonzero(self._cond_cov[cond] == cov)
            pool = self._controls[cov]
            controls[mine] = pool[rng.integers(0, pool.size, size=mine.size)]
        return rows, controls, cond

    def _assemble(self, epoch: int, batch: int) -> dict[str, Any]:
        rows, controls, cond = self.plan(epoch, batch)
        x = read_dense_rows(self.store, np.concatenate([rows, controls]),
                            log_normalise=self._log_normalise,
                            target_sum=self.cfg.perturbation.target_sum)
        return {CELL_INDEX: rows, CONTROL_INDEX: controls, CONDITION: cond,
                X_TARGET: x[: rows.size], X_CONTROL: x[rows.size:]}

    # --- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches_emitted": self._batches_emitted,
                "rank": self.rank, "world_size": self.world_size, "seed": self.cfg.seed,
                "batch_size": self.cfg.batch_size, "n_cells": int(self.store.n_cells),
                "n_train": self.num_train_cells}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; refuses a state whose plan differs (the stream would differ)."""
        mine = self.state_dict()
        missing = [k for k in mine if k not in state]
        if missing:
            raise ValueError(f"paired loader state lacks {missing}")
        diff = {k: (state[k], mine[k]) for k in _STATE_KEYS if state[k] != mine[k]}
        if diff:
            detail = ", ".join(f"{k}: state {a!r} != loader {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"paired loader state does not match this loader ({detail})")
        if not 0 <= int(state["batches_emitted"]) <= self.num_batches:
            raise ValueError(f"batches_emitted={state['batches_emitted']} is outside the epoch "
                             f"(0..{self.num_batches})")
        self._epoch, self._batches_emitted = int(state["epoch"]), int(state["batches_emitted"])

    # --- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch (a finished epoch moves on to the next one)."""
        if self.at_epoch_end:
            self._epoch, self._batches_emitted = self._epoch + 1, 0
        epoch = self._epoch
        with concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"PairedLoader-rank{self.rank}") as pool:
            pending: deque = deque()
            upcoming = iter(range(self._batches_emitted, self.num_batches))
            try:
                for b in upcoming:
                    pending.append(pool.submit(self._assemble, epoch, b))
                    if len(pending) >= self.cfg.prefetch_batches:
                        break
                while pending:
                    batch = pending.popleft().result()
                    nxt = next(upcoming, None)
                    if nxt is not None:
                        pending.append(pool.submit(self._assemble, epoch, nxt))
                    self._batches_emitted += 1
                    yield batch
            finally:
                for f in pending:
                    f.cancel()


# --- the task's context: what the driver computes once and every rank receives -----------------
@dataclasses.dataclass
class PairedTask:
    """A fine-tune's data as the driver sees it: the open store, its pseudo-bulk perturbation
    data, the split and the data config (what `ModelSpec.prepare` builds a model's priors from)."""

    src: Any
    data: PerturbationData
    split: Split
    config: PairedDataConfig

    def cell_conditions(self) -> tuple[np.ndarray, Any]:
        """Per-cell condition code (-1 = unused) and the condition table, from obs."""
        codes, table, _, _ = _group_cells(self.src.obs, self.config.perturbation, self.src.uri)
        return codes, table

    @property
    def perturbed_genes(self) -> list[str]:
        """Every gene perturbed in any condition of the data (train, val and test), sorted."""
        return sorted({g for p in self.data.perturbations.values() for g in p.genes})


def build_paired_context(task: PairedTask, pert_genes: list[str],
                         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain-value context every rank's inputs, model and validation are built from.

    Training conditions get their perturbed genes as rows of `pert_genes` (the model's
    perturbation table), the genes their loss counts (GEARS: genes with a nonzero mean in the
    condition), the sign of their mean change and their covariate's control mean; validation conditions their true mean change
    and top DE genes. `extra` (a model's priors) is merged in."""
    data, split = task.data, task.split
    index = {g: i for i, g in enumerate(pert_genes)}
    needed = sorted({g for c in [*split.train, *split.val]
                     for g in data.perturbation(c).genes} - set(index))
    if needed:
        raise ValueError(f"perturbed gene(s) {needed[:10]} are not in the model's perturbation "
                         f"table of {len(pert_genes)} genes")
    covariates = sorted(set(data.conditions["covariate"]))
    cov_pos = {c: i for i, c in enumerate(covariates)}
    table = data.conditions
    control_mean = np.stack([data.mean(table.index[table["is_control"]
                                                   & (table["covariate"] == cov)][0])
                             for cov in covariates]).astype(np.float32)

    def conditions(conds: list[str]) -> dict[str, Any]:
        genes, signs = encode_perturbations([data.perturbation(c) for c in conds], index)
        return {"conditions": list(conds), "pert_genes": genes, "pert_signs": signs,
                "covariate": np.array([cov_pos[data.conditions.at[c, "covariate"]]
                                       for c in conds], dtype=np.int64)}

    train = conditions(split.train)
    train["loss_genes"] = np.stack([data.mean(c) != 0 for c in split.train])
    train["delta_sign"] = np.stack([np.sign(data.delta(c)) for c in split.train]).astype(np.int8)
    context: dict[str, Any] = {
        "genes": list(data.genes), "symbols": list(data.symbols),
        "pert_genes": list(pert_genes), "covariates": covariates,
        "control_mean": control_mean, "train": train, "val": None}
    if split.val:
        val = conditions(split.val)
        val["delta"] = np.stack([data.delta(c) for c in split.val]).astype(np.float32)
        val["de_idx"] = np.stack([data.de_idx[c] for c in split.val]).astype(np.int64)
        context["val"] = val
    context.update(extra or {})
    return context


class PairedInputs:
    """A paired batch (numpy) -> the model's input tensors (the perturbation-model contract in
    `pertscale.constants`), from the task context."""

    def __init__(self, context: dict[str, Any]) -> None:
        train = context["train"]
        self.pert_genes = torch.as_tensor(train["pert_genes"])
        self.pert_signs = torch.as_tensor(train["pert_signs"])
        self.loss_genes = torch.as_tensor(train["loss_genes"])
        self.delta_sign = torch.as_tensor(train["delta_sign"])
        self.covariate = torch.as_tensor(train["covariate"])
        self.control_mean = torch.as_tensor(context["control_mean"])

    def __call__(self, batch: dict[str, Any], generator: Any = None) -> dict[str, torch.Tensor]:
        cond = torch.as_tensor(batch[CONDITION])
        return {X_CONTROL: torch.from_numpy(batch[X_CONTROL]),
                X_TARGET: torch.from_numpy(batch[X_TARGET]),
                CONDITION: cond,
                PERT_GENES: self.pert_genes[cond], PERT_SIGNS: self.pert_signs[cond],
                LOSS_GENES: self.loss_genes[cond],
                CONTROL_MEAN: self.control_mean[self.covariate[cond]],
                DELTA_SIGN: self.delta_sign[cond].float()}


class PairedValidation:
    """Validation of a paired model at an epoch's end: the mean squared error and Pearson
    correlation of the predicted mean change on each validation condition's top DE genes
    (GEARS picks its best epoch by the first, `score`)."""

    score = "val_mse_de"

    def __init__(self, context: dict[str, Any]) -> None:
        val = context["val"]
        self.genes = torch.as_tensor(val["pert_genes"])
        self.signs = torch.as_tensor(val["pert_signs"])
        self.delta = np.asarray(val["delta"], dtype=np.float64)
        self.de_idx = np.asarray(val["de_idx"])
        self.covariate = torch.as_tensor(val["covariate"])

    def __call__(self, module: torch.nn.Module, device: torch.device) -> dict[str, float]:
        was_training = module.training
        module.eval()
        try:
            pred = module.predict_delta(self.genes.to(device), self.signs.to(device),
                                        self.covariate.to(device)).double().cpu().numpy()
        finally:
            module.train(was_training)
        rows = np.arange(len(self.de_idx))[:, None]
        p, t = pred[rows, self.de_idx], self.delta[rows, self.de_idx]
        pearson = [np.corrcoef(a, b)[0, 1] if a.std() > 0 and b.std() > 0 else 0.0
                   for a, b in zip(p, t)]
        return {"val_mse_de": float(((p - t) ** 2).mean()),
                "val_pearson_delta_de": float(np.mean(pearson))}


class LossValidation:
    """Validation of a paired model by its negative ELBO on held-out cells of its training
    conditions (context "holdout_x", dense as X_TARGET): the model's `elbo` metric, per cell
    (scGen's early stopping on scvi-tools' elbo_validation). The module runs in eval mode (a VAE
    encodes to its latent mean: no sampling noise in the score), in fixed batches; every rank
    scores the same cells."""

    score = "val_elbo"

    def __init__(self, context: dict[str, Any], make_inputs: Any, batch_size: int = 1024) -> None:
        self.x = np.asarray(context["holdout_x"], dtype=np.float32)
        self.make_inputs, self.batch_size = make_inputs, batch_size

    def __call__(self, module: torch.nn.Module, device: torch.device) -> dict[str, float]:
        was_training = module.training
        module.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for i in range(0, len(self.x), self.batch_size):
                    x = self.x[i:i + self.batch_size]
                    inputs = self.make_inputs({X_TARGET: x})
                    out = module({k: v.to(device) for k, v in inputs.items()})
                    if "elbo" not in out.metrics:
                        raise ValueError(f"{type(module).__name__} reports no 'elbo' metric to "
                                         f"validate held-out cells on")
                    total += float(out.metrics["elbo"]) * len(x)
        finally:
            module.train(was_training)
        return {"val_elbo": total / max(len(self.x), 1)}
