"""scgen: scGen's VAE and latent vector arithmetic, fine-tuned on the engine.

Legend: B cells, G genes, H hidden width, Z latent dim, N cells of a sample, K perturbations,
C covariates (cell types).

The reference (theislab/scGen 2.1.0, `SCGENVAE` on scvi-tools' layers), by default: encoder and
decoder of `n_layers` x (Linear -> BatchNorm1d(eps 1e-3, momentum 0.01) -> LeakyReLU ->
Dropout), hidden 800, latent 100, dropout 0.2; q(z|x) = N(mu, exp(v) + 1e-4); decoder output
= expression (log1p values); loss = mean over cells of 0.5 x sum of squared errors +
0.5 x kl_weight x KL, kl_weight 5e-5.

Training sees every cell of the training conditions and the control cells of every covariate,
the held-out one included (as scGen trains on all cells but the held-out stimulated ones), less
`val_fraction` of each of them (seeded), on which the negative ELBO (SSE + the full KL, not the
training loss's 5e-5-weighted one) is scored after every epoch; with the job's `patience`
training stops early, and the configs export the last epoch (`export_weights = "last"`). scGen
(scvi-tools' `elbo_validation`) stops on the same ELBO of a random 10% of its cells, with z
sampled, and keeps its last epoch; ours is stratified by condition and scored at the latent mean
(no sampling noise). NOTE, measured on Kang: the full KL grows while the weighted training loss
falls, which is what ends training (38-43 epochs, the reference 29-43); stopping on the training
loss instead ran 61-83 epochs and transferred the response worse (mean R^2 DE 0.825 against
0.847 at 30 epochs), and exporting the ELBO's best epoch (13-18) worse still (CD14+ monocytes
R^2 DE 0.43 against 0.61).

Delta (computed at export from the exported (best epoch's) weights, on latent means):
    delta_k = mean over covariates t of [mean z(k, t) - mean z(control, t)]
over the covariates t where perturbation k was trained, each (k, t) and (control, t) group
represented by up to `delta_cells` cells drawn without replacement by `seed`. The reference
upsamples every cell type to the largest with replacement, then subsamples both conditions to
the same size: in expectation the same equal weight per type, with resampling noise and an
unseeded draw; it also averages the controls over every type, the held-out one included, while
the stimulated mean lacks it, so its delta carries a cell-type composition shift. Matching the
types removes that shift; averaging all drawn cells removes the noise.

Encoder: scGen's MLP (`encoder = "mlp"`), or the encoder of a registered pathway_vae
(`encoder = "pathway_vae"` with `init_from = "models:/pertscale-pathway_vae@..."`): its gene
tokens, transformer, GO pathway cross-attention and latent head, with its weights, its pathway
selection and its latent size; the decoder stays scGen's. A cell's log1p values over the genes
the pathway_vae knows (matched by id, else symbol; the count is reported) are packed into its
tokens; a cell with more nonzeros than its `max_seq_len` - 1 keeps its highest values (the
pretraining draws them uniformly; a deterministic choice keeps the latent of a cell fixed).

Prediction for perturbation k in covariate c: decode z(control cell of c) + delta_k for
`n_control_cells` control cells of c (drawn by `seed`), average, and subtract c's observed
control mean: the predicted mean change (`prediction = "cells"`, scGen's). With
`prediction = "change"` the same cells decoded without the shift are subtracted instead, so the
decoder's reconstruction error of the control cells cancels out of the change. A perturbation
never trained (in any covariate) cannot be predicted.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pertscale.config import ConfigError, check_choice, check_range
from pertscale.constants import (
    CLS_ID,
    CU_SEQLENS,
    EXPRESSION,
    GENE_IDS,
    MAX_SEQLEN,
    SPECIAL_TOKENS,
    X_TARGET,
)
from pertscale.models.output import LossOutput
from pertscale.models.spec import Exported, ModelConfig, ModelSpec

__all__ = ["ENCODERS", "PREDICTIONS", "SPEC", "ScGen", "ScGenConfig", "ScGenPredictor"]

PREDICTIONS = ("cells", "change")
ENCODERS = ("mlp", "pathway_vae")


@dataclasses.dataclass
class ScGenConfig(ModelConfig):
    """The `[model]` section of scgen (defaults: the reference's architecture)."""

    name: str = "scgen"
    hidden: int = 800          # width of every hidden layer (scGen: 800)
    n_layers: int = 2          # hidden layers of the encoder and of the decoder (scGen: 2)
    latent_dim: int = 100      # latent size (scGen: 100)
    dropout: float = 0.2       # dropout after every hidden layer (scGen: 0.2)
    kl_weight: float = 5e-5    # weight of the KL term (scGen: 5e-5)
    delta_cells: int = 1000    # cells per (perturbation, covariate) and control group for delta
    n_control_cells: int = 500 # control cells per covariate decoded at prediction
    seed: int = 0              # draws of the delta, prediction and validation cells
    val_fraction: float = 0.1  # cells of each training condition held out for the validation
                               # loss (early stopping with the job's `patience`; scGen: 0.1)
    val_max_cells: int = 10000 # at most this many validation cells (bounded memory)
    prediction: str = "cells"  # cells: decoded shifted cells - observed control mean (scGen);
                               # change: decoded shifted cells - the same cells decoded unshifted
    encoder: str = "mlp"       # mlp (scGen's) | pathway_vae (a registered one's: init_from;
                               # latent_dim is then its latent size)

    def __post_init__(self) -> None:
        self._check_name("scgen")
        for name in ("hidden", "n_layers", "latent_dim", "delta_cells", "n_control_cells",
                     "val_max_cells"):
            check_range(name, getattr(self, name), 1)
        check_range("val_fraction", self.val_fraction, 0.0, 0.5)
        check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_range("kl_weight", self.kl_weight, 0.0)
        check_range("seed", self.seed, 0)
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_choice("encoder", self.encoder, ENCODERS)


def _block(n_in: int, n_out: int, dropout: float) -> nn.Sequential:
    """scvi-tools' FCLayers layer as scGen uses it."""
    return nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out, eps=1e-3, momentum=0.01),
                         nn.LeakyReLU(), nn.Dropout(dropout))


class PathwayEncoder(nn.Module):
    """A pathway_vae's encoder on dense cells: x [B, G] (log1p, the task's genes) -> packed
    tokens over the pathway_vae's vocabulary -> (mean, variance) of its latent."""

    def __init__(self, parent: dict[str, Any], columns: np.ndarray):
        super().__init__()
        from pertscale.models.pathway_vae import PathwayVAEConfig, build_pathway_vae

        pcfg = PathwayVAEConfig.from_dict(parent["config"]["model_config"], path="model")
        vae = build_pathway_vae(pcfg, {"vocab": parent["vocab"],
                                       "gene_symbols": parent["config"]["gene_symbols"],
                                       "pathways": parent["config"]["pathways"],
                                       "likelihood": parent["config"]["likelihood"]})
        self.encoder = vae.encoder
        self.latent_dim = pcfg.latent_dim
        self.limit = pcfg.max_seq_len - 1
        known = np.flatnonzero(columns >= 0)
        # NOTE: constants of the task (which task genes the pathway_vae knows), not weights
        self.register_buffer("task_cols", torch.as_tensor(known), persistent=False)
        self.register_buffer("token_ids", torch.as_tensor(columns[known] + len(SPECIAL_TOKENS)),
                             persistent=False)

    def pack(self, x_BG: torch.Tensor) -> dict[str, Any]:
        """The expression batch of the pathway_vae for dense cells (module docstring)."""
        x = x_BG.index_select(1, self.task_cols)
        k = min(self.limit, x.shape[1])
        vals, idx = torch.topk(torch.where(x != 0, x, torch.full_like(x, -torch.inf)), k, dim=1)
        B = x.shape[0]
        valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device),
                           vals > -torch.inf], 1)
        ids = torch.cat([torch.full((B, 1), CLS_ID, device=x.device),
                         self.token_ids[idx]], 1)
        values = torch.cat([torch.ones(B, 1, dtype=x.dtype, device=x.device),
                            torch.where(valid[:, 1:], vals, 0.0)], 1)
        lengths = valid.sum(1)
        cu = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
        cu[1:] = torch.cumsum(lengths, 0)
        return {GENE_IDS: ids[valid], EXPRESSION: values[valid], CU_SEQLENS: cu,
                MAX_SEQLEN: int(lengths.max()) if B else 1}

    def forward(self, x_BG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, mu, logvar = self.encoder(self.pack(x_BG))
        return mu, torch.exp(logvar) + 1e-4


class MLPEncoder(nn.Module):
    """scGen's encoder: x [B, G] -> (mean, variance) of q(z | x)."""

    def __init__(self, cfg: ScGenConfig, n_genes: int):
        super().__init__()
        widths = [n_genes] + [cfg.hidden] * cfg.n_layers
        self.encoder = nn.Sequential(*(_block(a, b, cfg.dropout)
                                       for a, b in itertools.pairwise(widths)))
        self.mean = nn.Linear(cfg.hidden, cfg.latent_dim)
        self.var = nn.Linear(cfg.hidden, cfg.latent_dim)
        self.latent_dim = cfg.latent_dim

    def forward(self, x_BG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x_BG)
        return self.mean(h), torch.exp(self.var(h)) + 1e-4


class ScGen(nn.Module):
    """forward(paired batch) -> LossOutput(loss, metrics {recon_sse, kl}): the VAE on the
    batch's X_TARGET cells (training conditions and controls alike). `parent` (the
    pathway_vae's kind, config and vocabulary) and `columns` (its gene index of each task gene,
    -1 = unknown to it) are needed with `encoder = "pathway_vae"`."""

    def __init__(self, cfg: ScGenConfig, n_genes: int, parent: dict[str, Any] | None = None,
                 columns: np.ndarray | None = None):
        super().__init__()
        if cfg.encoder == "pathway_vae":
            self.q = PathwayEncoder(parent, columns)
        else:
            self.q = MLPEncoder(cfg, n_genes)
        latent = self.q.latent_dim
        widths = [latent] + [cfg.hidden] * cfg.n_layers
        self.decoder = nn.Sequential(*(_block(a, b, cfg.dropout)
                                       for a, b in itertools.pairwise(widths)),
                                     nn.Linear(cfg.hidden, n_genes))
        self.kl_weight = cfg.kl_weight

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[-1].weight.dtype

    def encode(self, x_BG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) of q(z | x)."""
        return self.q(x_BG)

    def forward(self, batch: dict) -> LossOutput:
        x = batch[X_TARGET].to(self.dtype)
        mu, var = self.encode(x)
        z = mu + var.sqrt() * torch.randn_like(mu) if self.training else mu
        acc = torch.promote_types(x.dtype, torch.float32)
        sse = ((self.decoder(z).to(acc) - x.to(acc)) ** 2).sum(-1)
        mu, var = mu.to(acc), var.to(acc)
        kl = 0.5 * (var + mu ** 2 - 1.0 - var.log()).sum(-1)
        loss = (0.5 * sse + 0.5 * self.kl_weight * kl).mean()
        # the ELBO with the full KL: scvi-tools' elbo_validation, what scGen stops early on
        return LossOutput(loss=loss, metrics={"recon_sse": sse.mean().detach(),
                                              "kl": kl.mean().detach(),
                                              "elbo": (sse + kl).mean().detach()})

    @torch.no_grad()
    def latent(self, x_NG: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Latent means of cells (eval mode)."""
        was = self.training
        self.eval()
        try:
            return torch.cat([self.encode(x_NG[i:i + batch_size])[0]
                              for i in range(0, len(x_NG), batch_size)] or
                             [x_NG.new_zeros(0, self.q.latent_dim)])
        finally:
            self.train(was)


def parent_columns(context: dict[str, Any], parent: dict[str, Any]) -> np.ndarray:
    """The pathway_vae's gene index of each task gene (id, else symbol; -1 = unknown)."""
    genes = list(parent["vocab"])[len(SPECIAL_TOKENS):]
    symbols = parent["config"].get("gene_symbols") or genes
    index = {g: i for i, g in enumerate(genes)}
    index.update({s: i for i, s in enumerate(symbols) if s not in index})
    return np.array([index.get(g, index.get(s, -1))
                     for g, s in zip(context["genes"], context["symbols"])], dtype=np.int64)


def _parent(cfg: ScGenConfig, context: dict[str, Any]) -> dict[str, Any] | None:
    """The pathway_vae this scgen's encoder comes from (None for the MLP encoder)."""
    if cfg.encoder != "pathway_vae":
        return None
    parent = context.get("init_parent")
    if parent is None or parent["kind"] != "pathway_vae":
        raise ConfigError("model.encoder='pathway_vae' takes a registered pathway_vae's encoder: "
                          "set init_from = \"models:/pertscale-pathway_vae@ALIAS\"")
    return parent


def build_scgen(cfg: ScGenConfig, context: dict[str, Any]) -> ScGen:
    parent = _parent(cfg, context)
    columns = parent_columns(context, parent) if parent is not None else None
    return ScGen(cfg, len(context["genes"]), parent, columns)


def _init_from(cfg: ScGenConfig, parent: ModelSpec, exported: Exported, data: Any):
    """The encoder weights of a registered pathway_vae (`encoder = "pathway_vae"`)."""
    if cfg.encoder != "pathway_vae" or parent.name != "pathway_vae":
        raise ValueError(f"scgen takes a pathway_vae's encoder (model.encoder='pathway_vae'); "
                         f"this is a {parent.name} model and model.encoder={cfg.encoder!r}")
    values = {f"q.{k}": v for k, v in exported.tensors.items() if k.startswith("encoder.")}
    columns = parent_columns({"genes": data.genes, "symbols": data.symbols},
                             {"vocab": exported.vocab, "config": exported.config})
    known = int((columns >= 0).sum())
    if known == 0:
        raise ValueError(f"none of the store's {len(data.genes)} genes is a gene of the "
                         f"pathway_vae's vocabulary of {len(exported.vocab)} tokens")
    return values, None, {"init_encoder": "pathway_vae",
                          "init_genes_matched": f"{known}/{len(data.genes)}"}


def _inputs(job: Any, context: dict[str, Any]):
    def make(batch: dict[str, Any], generator: Any = None) -> dict[str, torch.Tensor]:
        return {X_TARGET: torch.from_numpy(batch[X_TARGET])}

    return make


def _prepare(job: Any, task: Any) -> dict[str, Any]:
    """On the driver: the loader's conditions (training conditions and every control), the
    perturbations scGen can predict, and the seeded cell samples for delta and prediction."""
    from pertscale.data.paired import control_rows, holdout_rows, read_dense_rows

    if job.data.split.kind != "heldout_covariate":
        raise ConfigError(f"scgen predicts a perturbation seen in other covariates: use "
                          f"data.split.kind = 'heldout_covariate', not {job.data.split.kind!r}")
    cfg, data, split = job.model, task.data, task.split
    codes, table = task.cell_conditions()
    covariates = sorted(set(table["covariate"]))
    controls = dict(zip(covariates, control_rows(codes, table, covariates)))
    rng = np.random.default_rng([cfg.seed, 11])

    def draw(rows: np.ndarray, n: int) -> np.ndarray:
        return np.sort(rng.choice(rows, min(n, rows.size), replace=False))

    perturbations = sorted({data.perturbation(c).name for c in split.train})
    groups, rows = [], []  # (perturbation or "", covariate), store rows
    for k, pert in enumerate(perturbations):
        for cond in split.train:
            if data.perturbation(cond).name != pert:
                continue
            cov = data.conditions.at[cond, "covariate"]
            cells = np.flatnonzero(codes == table.index.get_loc(cond))
            groups += [(k, covariates.index(cov), 1), (k, covariates.index(cov), 0)]
            rows += [draw(cells, cfg.delta_cells), draw(controls[cov], cfg.delta_cells)]
    ctrl_rows = [draw(controls[cov], cfg.n_control_cells) for cov in covariates]
    norm = {"log_normalise": bool(task.src.raw_counts),
            "target_sum": task.config.perturbation.target_sum}
    sizes = [len(r) for r in rows]
    loader_conditions = [*split.train, *table.index[table["is_control"]]]
    holdout = {}
    if cfg.val_fraction > 0:
        val_rows = holdout_rows(codes, [table.index.get_loc(c) for c in loader_conditions],
                                cfg.val_fraction, cfg.val_max_cells, cfg.seed)
        holdout = {"holdout_rows": val_rows,
                   "holdout_x": read_dense_rows(task.src, val_rows, **norm)}
    return {"pert_genes": task.perturbed_genes, "scgen_perturbations": perturbations,
            "loader_conditions": loader_conditions, **holdout,
            "delta_x": read_dense_rows(task.src, np.concatenate(rows), **norm),
            "delta_groups": np.array(groups, dtype=np.int64),
            "delta_sizes": np.array(sizes, dtype=np.int64),
            "control_x": read_dense_rows(task.src, np.concatenate(ctrl_rows), **norm),
            "control_sizes": np.array([len(r) for r in ctrl_rows], dtype=np.int64),
            "report": {"perturbations": len(perturbations), "delta_groups": len(groups),
                       "val_cells": len(holdout.get("holdout_rows", ())),
                       "delta_cells": int(sum(sizes)),
                       "control_cells": int(sum(len(r) for r in ctrl_rows))}}


def compute_delta(module: ScGen, x_NG: np.ndarray, groups: np.ndarray, sizes: np.ndarray,
                  n_perturbations: int) -> np.ndarray:
    """[K, Z] latent deltas from the sampled groups (module docstring): `groups` rows are
    (perturbation, covariate, 1 = perturbed / 0 = control), `sizes` the cells of each."""
    z = module.latent(torch.as_tensor(x_NG, dtype=module.dtype)).double().numpy()
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    means = np.stack([z[a:b].mean(0) for a, b in itertools.pairwise(bounds)])
    delta = np.zeros((n_perturbations, z.shape[1]))
    for k in range(n_perturbations):
        pert = (groups[:, 0] == k) & (groups[:, 2] == 1)
        ctrl = (groups[:, 0] == k) & (groups[:, 2] == 0)
        delta[k] = (means[pert] - means[ctrl]).mean(0)  # rows pair up covariate by covariate
    return delta


def export_scgen(cfg: ScGenConfig, state_dict: dict[str, torch.Tensor],
                 context: dict[str, Any]) -> Exported:
    """Weights plus, computed here from them, the latent deltas and the prediction cells'
    latents per covariate, and each covariate's control mean."""
    task = context["context"]
    module = build_scgen(cfg, task)
    module.load_state_dict(state_dict)
    parent = _parent(cfg, task)
    delta = compute_delta(module, task["delta_x"], task["delta_groups"], task["delta_sizes"],
                          len(task["scgen_perturbations"]))
    control_z = module.latent(torch.as_tensor(task["control_x"]))
    tensors = {**state_dict, "scgen.delta": torch.as_tensor(delta, dtype=torch.float32),
               "scgen.control_z": control_z.float(),
               "scgen.control_sizes": torch.as_tensor(task["control_sizes"]),
               "scgen.control_mean": torch.as_tensor(task["control_mean"], dtype=torch.float32)}
    return Exported(tensors=tensors,
                    config={"model": "scgen", "model_config": cfg.to_dict(),
                            "gene_symbols": list(task["symbols"]),
                            "perturbations": list(task["scgen_perturbations"]),
                            "covariates": list(task["covariates"]),
                            "encoder_parent": parent,
                            "training": dict(context.get("training") or {})},
                    vocab=list(task["genes"]))


class ScGenPredictor:
    """A pulled scgen: the predicted mean change of a trained perturbation in a covariate."""

    def __init__(self, exported: Exported) -> None:
        cfg = ScGenConfig.from_dict(exported.config["model_config"], path="model")
        self.prediction = cfg.prediction
        self.genes = list(exported.vocab)
        self.perturbations = {p: i for i, p in enumerate(exported.config["perturbations"])}
        self.covariates = {c: i for i, c in enumerate(exported.config["covariates"])}
        t = dict(exported.tensors)
        self.delta = t.pop("scgen.delta").double()
        sizes = t.pop("scgen.control_sizes").numpy()
        self.control_z = torch.split(t.pop("scgen.control_z").double(), sizes.tolist())
        self.control_mean = t.pop("scgen.control_mean").double().numpy()
        parent = exported.config.get("encoder_parent")
        symbols = exported.config["gene_symbols"]
        columns = (parent_columns({"genes": self.genes, "symbols": symbols}, parent)
                   if parent is not None else None)
        self.model = ScGen(cfg, len(self.genes), parent, columns).double()
        self.model.load_state_dict(t)
        self.model.eval()

    def missing_genes(self, perturbations: Sequence[Any]) -> list[str]:
        """Perturbations never trained (by name): scGen cannot predict them."""
        return sorted({p.name for p in perturbations if p.name not in self.perturbations})

    @torch.no_grad()
    def predict_delta(self, perturbations: Sequence[Any],
                      covariates: Sequence[str] | None = None) -> np.ndarray:
        if covariates is None:
            if len(self.covariates) != 1:
                raise ValueError(f"this scgen model has covariates {sorted(self.covariates)}: "
                                 f"name one per perturbation")
            covariates = [next(iter(self.covariates))] * len(perturbations)
        out = np.empty((len(perturbations), len(self.genes)))
        for i, (p, cov) in enumerate(zip(perturbations, covariates)):
            if p.name not in self.perturbations:
                raise ValueError(f"scgen was not trained on perturbation {p.name!r}")
            if cov not in self.covariates:
                raise ValueError(f"covariate {cov!r} is not one of {sorted(self.covariates)}")
            c = self.covariates[cov]
            z = self.control_z[c]
            shifted = self.model.decoder(z + self.delta[self.perturbations[p.name]]).mean(0)
            base = (self.model.decoder(z).mean(0).numpy() if self.prediction == "change"
                    else self.control_mean[c])
            out[i] = shifted.numpy() - base
        return out


SPEC = ModelSpec(
    name="scgen",
    debug_config="configs/scgen_debug.toml",
    description="scGen: VAE with latent vector arithmetic, a perturbation moved to a held-out type",
    config_cls=ScGenConfig,
    task="paired",
    predicts="delta",
    build=build_scgen,
    make_inputs=_inputs,
    prepare=_prepare,
    export=export_scgen,
    load=ScGenPredictor,
    init_from=_init_from,
)
