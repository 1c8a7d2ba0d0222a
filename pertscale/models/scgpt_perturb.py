"""scGPT's own perturbation task: the control cell's expression in, the perturbed cell's out, with
a perturbation flag on every gene token (bowang-lab/scGPT `scgpt/model/generation_model.py`,
TransformerGenerator, and its perturbation tutorial).

    h_l    = LayerNorm(E_gene[g_l]) + ValueEncoder(x_control[g_l]) + E_flag[f_l]     [B, L, C]
    f_l    = 0 (not perturbed), 1 (activated), 2 (inhibited)      one flag per gene token
    y_hat  = ExprDecoder(Transformer(h))                                            [B, L]
    loss   = mean over cells and tokens of (y_hat - y_target)^2

The condition is said per gene token (which gene, which direction), not once per cell, so a
perturbation of an unseen gene or combination is a new set of flags on genes the model knows.
The gene embedding, value encoder, transformer layers and expression decoder have scgpt's names
and shapes: `init_from` a registered scgpt copies them (gene rows where genes match; the
model's size must equal the parent's), as scGPT fine-tunes its pretrained model. Values are the
log1p-normalised expression itself (scGPT's perturbation task feeds continuous values, not
bins). A step reads `max_seq_len` genes per cell: every gene when there are no more, else the
batch's perturbed genes plus genes drawn by the step's generator (scGPT draws a random subset
too, without keeping the perturbed genes).

Mean change of a perturbation (`predict_delta`, validation and the predictor): the model is run
on `n_control_cells` fixed control cells of the covariate over every gene, and the change is
the mean predicted cell minus the mean of those control cells (scGPT predicts from a pool of
control cells the same way). The pool is a buffer, exported with the weights.

Legend: B cells, G readout genes, L gene tokens of a step, C d_model, K perturbed genes per
cell (padded), V covariates, N control cells per covariate, P perturbations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pertscale.config import ConfigError, check_choice, check_range
from pertscale.constants import GENE_IDS, PERT_GENES, PERT_SIGNS, X_CONTROL, X_TARGET
from pertscale.models.attention import plan_attention
from pertscale.models.output import LossOutput
from pertscale.models.scgpt import (
    SCGPT_FLAVORS,
    ContinuousValueEncoder,
    EncoderLayer,
    ExprDecoder,
    ScGPTConfig,
    ScGPTSize,
)
from pertscale.models.spec import (
    Exported,
    ModelConfig,
    ModelSpec,
    encode_perturbations,
    export_paired,
    unrepresented,
)

__all__ = ["SPEC", "ScGPTPerturb", "ScGPTPerturbConfig", "ScGPTPerturbPredictor"]

FLAG_NONE, FLAG_UP, FLAG_DOWN = 0, 1, 2
# scgpt parameters scgpt_perturb shares by name and shape (init_from copies them)
SHARED_PREFIXES = ("gene_norm.", "value_encoder.", "layers.", "final_norm.", "expr_decoder.")
PREDICT_ROWS = 64  # cells per forward when predicting mean changes


@dataclasses.dataclass
class ScGPTPerturbConfig(ModelConfig):
    """The `[model]` section of scgpt_perturb (sizes as scgpt's; must equal an init_from parent's)."""

    name: str = "scgpt_perturb"
    flavor: str = "debug"              # size preset of scgpt: debug | small
    d_model: int = 0                   # override the flavor's width (0 = flavor default)
    n_layers: int = 0                  # override the flavor's depth (0 = flavor default)
    n_heads: int = 0                   # override the flavor's heads (0 = flavor default)
    d_ff: int = 0                      # override the flavor's feed-forward width (0 = default)
    attention: str = "auto"            # auto (sdpa) | reference | sdpa
    dropout: float = 0.0               # dropout on embeddings and sublayer outputs (scGPT: 0.2)
    norm_first: bool = False           # pre-norm layers (scGPT: post-norm)
    max_seq_len: int = 1536            # gene tokens per cell in a step (scGPT: 1536)
    n_control_cells: int = 32          # control cells per covariate the mean change is predicted from

    def __post_init__(self) -> None:
        self._check_name("scgpt_perturb")
        check_choice("flavor", self.flavor, SCGPT_FLAVORS)
        check_choice("attention", self.attention, ["auto", "reference", "sdpa"])
        for name in ("d_model", "n_layers", "n_heads", "d_ff"):
            check_range(name, getattr(self, name), 0)
        check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_range("max_seq_len", self.max_seq_len, 1)
        check_range("n_control_cells", self.n_control_cells, 1)
        size = self.size()
        if size.d_model % size.n_heads:
            raise ConfigError(f"d_model={size.d_model} is not divisible by n_heads={size.n_heads}")

    size = ScGPTConfig.size


class ScGPTPerturb(nn.Module):
    """The perturbation transformer over G readout genes (module doc); forward takes a
    paired-task batch with GENE_IDS (the step's gene tokens)."""

    def __init__(self, cfg: ScGPTPerturbConfig, n_genes: int, control_pool_VNG: torch.Tensor
                 ) -> None:
        super().__init__()
        size: ScGPTSize = cfg.size()
        C = size.d_model
        self.cfg, self.n_genes = cfg, n_genes
        self.backend = "sdpa" if cfg.attention == "auto" else cfg.attention
        self.gene_embedding = nn.Embedding(n_genes, C)
        nn.init.uniform_(self.gene_embedding.weight, -0.1, 0.1)  # scGPT's init_weights
        self.gene_norm = nn.LayerNorm(C)
        self.value_encoder = ContinuousValueEncoder(C, cfg.dropout)
        self.flag_embedding = nn.Embedding(3, C)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(size, cfg.dropout, cfg.norm_first)
                                    for _ in range(size.n_layers))
        self.final_norm = nn.LayerNorm(C) if cfg.norm_first else nn.Identity()
        self.expr_decoder = ExprDecoder(C)
        # NOTE: copied: the array may be shared memory (Ray's object store, across ranks).
        self.register_buffer("control_pool", torch.as_tensor(control_pool_VNG).float().clone())

    def _flags(self, pert_genes_BK: torch.Tensor, pert_signs_BK: torch.Tensor,
               gene_ids_L: torch.Tensor) -> torch.Tensor:
        """[B, L] flag of each gene token: its direction where the cell's perturbation has it."""
        B, L = pert_genes_BK.shape[0], gene_ids_L.numel()
        pos_G = torch.full((self.n_genes,), -1, dtype=torch.long, device=gene_ids_L.device)
        pos_G[gene_ids_L] = torch.arange(L, device=gene_ids_L.device)
        pos_BK = torch.where(pert_genes_BK >= 0, pos_G[pert_genes_BK.clamp(min=0)], -1)
        flag_BK = torch.where(pert_signs_BK < 0, FLAG_DOWN, FLAG_UP)
        flags_BL = torch.zeros((B, L + 1), dtype=torch.long, device=gene_ids_L.device)
        # tokens outside the step (position -1) land in a spare last column, dropped after
        flags_BL.scatter_(1, torch.where(pos_BK >= 0, pos_BK, L), flag_BK)
        return flags_BL[:, :L]

    def _expression(self, gene_ids_L: torch.Tensor, x_BL: torch.Tensor,
                    flags_BL: torch.Tensor) -> torch.Tensor:
        h = (self.gene_norm(self.gene_embedding(gene_ids_L))[None] + self.value_encoder(x_BL)
             + self.flag_embedding(flags_BL))
        h = self.dropout(h)
        plan = plan_attention(self.backend)  # full attention over the step's genes
        for layer in self.layers:
            h = layer(h, plan)
        return self.expr_decoder(self.final_norm(h))

    def forward(self, inputs: dict[str, Any]) -> LossOutput:
        gene_ids_L = inputs[GENE_IDS]
        x_BL = inputs[X_CONTROL][:, gene_ids_L]
        y_BL = inputs[X_TARGET][:, gene_ids_L]
        flags_BL = self._flags(inputs[PERT_GENES], inputs[PERT_SIGNS], gene_ids_L)
        pred_BL = self._expression(gene_ids_L, x_BL, flags_BL)
        mse = ((pred_BL.float() - y_BL.float()) ** 2).mean()
        return LossOutput(loss=mse, metrics={"mse": mse.detach()},
                          outputs={"predictions": pred_BL.detach()})

    @torch.no_grad()
    def predict_delta(self, pert_genes_PK: torch.Tensor, pert_signs_PK: torch.Tensor,
                      covariate_P: torch.Tensor) -> torch.Tensor:
        """[P, G] mean predicted change of each perturbation on its covariate's control pool."""
        device = self.control_pool.device
        genes_G = torch.arange(self.n_genes, device=device)
        N = self.control_pool.shape[1]
        out = torch.empty((pert_genes_PK.shape[0], self.n_genes), device=device)
        per_chunk = max(1, PREDICT_ROWS // N)
        for start in range(0, pert_genes_PK.shape[0], per_chunk):
            sl = slice(start, start + per_chunk)
            pool_pNG = self.control_pool[covariate_P[sl].to(device)]
            p = pool_pNG.shape[0]
            flags = self._flags(pert_genes_PK[sl].to(device).repeat_interleave(N, 0),
                                pert_signs_PK[sl].to(device).repeat_interleave(N, 0), genes_G)
            pred = self._expression(genes_G, pool_pNG.reshape(p * N, -1), flags)
            out[sl] = (pred.float().reshape(p, N, -1) - pool_pNG).mean(1)
        return out


class ScGPTPerturbInputs:
    """A paired batch -> the model's inputs: the paired contract plus GENE_IDS, the step's gene
    tokens (all genes, or the batch's perturbed genes plus genes drawn by `generator`)."""

    def __init__(self, cfg: ScGPTPerturbConfig, context: dict[str, Any]) -> None:
        from pertscale.data.paired import PairedInputs

        self.paired = PairedInputs(context)
        self.n_genes, self.max_len = len(context["genes"]), cfg.max_seq_len

    def __call__(self, batch: dict[str, Any], generator: Any = None) -> dict[str, torch.Tensor]:
        inputs = self.paired(batch)
        if self.n_genes <= self.max_len:
            inputs[GENE_IDS] = torch.arange(self.n_genes)
            return inputs
        perturbed = inputs[PERT_GENES].unique()
        perturbed = perturbed[perturbed >= 0]
        if perturbed.numel() > self.max_len:
            raise ValueError(f"a batch perturbs {perturbed.numel()} genes, more than "
                             f"model.max_seq_len={self.max_len}")
        others = torch.ones(self.n_genes, dtype=torch.bool)
        others[perturbed] = False
        pool = others.nonzero().squeeze(1)
        drawn = pool[torch.randperm(pool.numel(), generator=generator)[
            : self.max_len - perturbed.numel()]]
        inputs[GENE_IDS] = torch.cat([perturbed, drawn]).sort().values
        return inputs


# --- the spec ----------------------------------------------------------------------------------
def build_scgpt_perturb(cfg: ScGPTPerturbConfig, context: dict[str, Any]) -> ScGPTPerturb:
    return ScGPTPerturb(cfg, len(context["genes"]), torch.as_tensor(context["control_pool"]))


def _prepare(job: Any, task: Any) -> dict[str, Any]:
    """The perturbation table (the readout genes' symbols: a perturbed gene must be read out to
    carry its flag) and the control pool: `n_control_cells` control cells of each covariate,
    drawn without replacement (with, where a covariate has fewer) by the data seed."""
    from pertscale.data.paired import control_rows, read_dense_rows

    data, cfg = task.data, job.model
    codes, table = task.cell_conditions()
    covariates = sorted(set(data.conditions["covariate"]))
    rng = np.random.default_rng([task.config.seed, 7])
    pool, short = [], []
    for cov, rows in zip(covariates, control_rows(codes, table, covariates)):
        if rows.size < cfg.n_control_cells:
            short.append(f"{cov} ({rows.size})")
        picked = np.sort(rng.choice(rows, cfg.n_control_cells,
                                    replace=rows.size < cfg.n_control_cells))
        pool.append(read_dense_rows(task.src, picked, log_normalise=bool(task.src.raw_counts),
                                    target_sum=task.config.perturbation.target_sum))
    return {"pert_genes": list(data.symbols), "control_pool": np.stack(pool),
            "report": {"control_cells_per_covariate": cfg.n_control_cells,
                       "covariates_with_fewer_controls": short}}


def _inputs(job: Any, context: dict[str, Any]) -> ScGPTPerturbInputs:
    return ScGPTPerturbInputs(job.model, context)


def _init_from(cfg: ScGPTPerturbConfig, parent: ModelSpec, exported: Exported, data: Any):
    """scgpt's shared parameters (SHARED_PREFIXES) and its gene embedding rows where the store's
    genes are in its vocabulary (by gene id, else symbol)."""
    if parent.name != "scgpt":
        raise ValueError(f"scgpt_perturb starts from a registered scgpt, not a {parent.name}")
    pcfg = ScGPTConfig.from_dict(exported.config["model_config"], path="model")
    if pcfg.size() != cfg.size():
        raise ValueError(f"the parent scgpt has size {pcfg.size()}, model has {cfg.size()}: "
                         f"set model.flavor / d_model / n_layers / n_heads / d_ff to the parent's")
    if pcfg.value_encoder != "continuous" or pcfg.norm_first != cfg.norm_first:
        raise ValueError(f"the parent scgpt has value_encoder={pcfg.value_encoder!r}, "
                         f"norm_first={pcfg.norm_first}; scgpt_perturb needs a continuous "
                         f"value encoder and norm_first={cfg.norm_first}")
    t = exported.tensors
    values: dict[str, Any] = {k: v.float().numpy() for k, v in t.items()
                              if k.startswith(SHARED_PREFIXES)}
    vocab_genes = list(exported.vocab[3:])
    symbols = list(exported.config.get("gene_symbols") or vocab_genes)
    by_id = {g: i for i, g in enumerate(vocab_genes)}
    by_symbol = {s: i for i, s in enumerate(symbols)}
    rows = np.array([by_id.get(g, by_symbol.get(s, -1)) for g, s in zip(data.genes, data.symbols)])
    mask = rows >= 0
    if not mask.any():
        raise ValueError(f"none of the store's {len(data.genes)} genes is in the parent's "
                         f"vocabulary of {len(vocab_genes)} genes")
    table = t["gene_embedding.weight"][3:].float().numpy()
    emb = np.zeros((len(data.genes), table.shape[1]), dtype=np.float32)
    emb[mask] = table[rows[mask]]
    values["gene_embedding.weight"] = emb
    return (values, {"gene_embedding.weight": mask},
            {"init_genes_matched": f"{int(mask.sum())}/{len(data.genes)}",
             "init_tensors": str(len(values))})


def export_scgpt_perturb(cfg: ScGPTPerturbConfig, state_dict: dict[str, torch.Tensor],
                         context: dict[str, Any]) -> Exported:
    """Weights (the control pool included), the `[model]` section, genes and covariates."""
    return export_paired("scgpt_perturb", cfg, state_dict, context,
                         covariates=list(context["context"]["covariates"]))


class ScGPTPerturbPredictor:
    """A pulled scgpt_perturb as a `PerturbationPredictor`: perturbed genes by symbol or id."""

    def __init__(self, exported: Exported) -> None:
        cfg = ScGPTPerturbConfig.from_dict(exported.config["model_config"], path="model")
        self.genes = list(exported.vocab)
        symbols = list(exported.config["gene_symbols"])
        self.covariates = list(exported.config["covariates"])
        self._index = {g: i for i, g in enumerate(self.genes)}
        self._index.update({s: i for i, s in enumerate(symbols) if s not in self._index})
        self.model = ScGPTPerturb(cfg, len(self.genes), exported.tensors["control_pool"])
        self.model.load_state_dict(exported.tensors)
        self.model.eval()

    def missing_genes(self, perturbations: Sequence[Any]) -> list[str]:
        return unrepresented(perturbations, self._index)

    def predict_delta(self, perturbations: Sequence[Any],
                      covariates: Sequence[str] | None = None) -> np.ndarray:
        if covariates is None:
            if len(self.covariates) != 1:
                raise ValueError(f"this scgpt_perturb model knows covariates {self.covariates}: "
                                 f"name one per perturbation")
            covariates = self.covariates * len(perturbations)
        unknown = sorted(set(covariates) - set(self.covariates))
        if unknown:
            raise ValueError(f"covariate(s) {unknown} are not among the model's "
                             f"{self.covariates}")
        genes, signs = encode_perturbations(perturbations, self._index)
        cov = torch.tensor([self.covariates.index(c) for c in covariates], dtype=torch.long)
        return self.model.predict_delta(torch.from_numpy(genes), torch.from_numpy(signs),
                                        cov).double().numpy()


SPEC = ModelSpec(
    name="scgpt_perturb",
    debug_config="configs/scgpt_perturb_debug.toml",
    description="scGPT's perturbation task: control cell in, perturbed cell out, a "
                "perturbation flag per gene token",
    config_cls=ScGPTPerturbConfig,
    task="paired",
    predicts="delta",
    build=build_scgpt_perturb,
    make_inputs=_inputs,
    prepare=_prepare,
    export=export_scgpt_perturb,
    load=ScGPTPerturbPredictor,
    init_from=_init_from,
)
