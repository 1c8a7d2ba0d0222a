"""GEARS: gene embeddings on a co-expression graph, signed perturbation embeddings on a GO graph,
and a gene-wise decoder of each cell's change, fine-tuned on perturbed cells paired with
controls (Roohani et al. 2023; the reference is snap-stanford/GEARS gears/model.py).

    h_gene = MLP(relu(BN(E_gene)) + 0.2 * SGConv_coexpress(E_pos))          [G, H], once
    h_pert = SGConv_GO(E_pert)                                                [P, H], once
    h_P    = MLP(sum_j a_j h_pert[g_j])  with a_j = +1 / -1 (activation / inhibition)   [B, H]
    h      = relu(BN(h_gene + h_P))                                           [B, G, H]
    d_g    = w1_g . MLP(h_g) + b1_g;  c = MLP_cross(d);  delta_g = w2_g . [d_g, c] + b2_g
    y_hat  = x_control + delta

The graphs and gene embeddings are computed once per forward and broadcast over the batch;
no graph is ever copied per cell. Loss per perturbation in the batch, over the genes GEARS keeps
(LOSS_GENES), then averaged over perturbations: autofocus |y - y_hat|^(2 + gamma), plus
lambda x a direction term with a gradient (the reference's sign(y_hat - ctrl) has zero gradient
everywhere): `direction = "mean"` (default) (sign(mean change of the condition) -
tanh(k delta))^2, the predicted change against the sign of the condition's pseudo-bulk change;
`"cell"` the reference's per-cell form with a smooth sign, (sign(y - ctrl) - tanh(k (y_hat -
ctrl)))^2, whose target and prediction both carry each cell's noise; plus, with the uncertainty
head, a Gaussian negative log-likelihood 0.5 (log s^2 + (y - y_hat)^2 / s^2) (the reference omits the
log-variance term, which lets s^2 grow without bound).

NOTE: the reference embeds with nn.Embedding(max_norm=True), which renormalises rows in place
at lookup; in place writes to a ZeRO-3 partitioned weight would be lost, so the same cap
(row norm <= 1) is applied functionally here, with the scale treated as a constant.

Legend: B cells, G readout genes, P perturbable genes (GO graph nodes), K perturbed genes per
cell (padded), H hidden size, E graph edges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pertscale.config import check_choice, check_range
from pertscale.constants import (
    CONDITION,
    CONTROL_MEAN,
    DELTA_SIGN,
    LOSS_GENES,
    PERT_GENES,
    PERT_SIGNS,
    X_CONTROL,
    X_TARGET,
)
from pertscale.models.output import LossOutput
from pertscale.models.spec import (
    Exported,
    ModelConfig,
    ModelSpec,
    encode_perturbations,
    export_paired,
    unrepresented,
)

DIRECTIONS = ("mean", "cell")

__all__ = ["GEARS", "SPEC", "GEARSConfig", "GearsPredictor", "build_gears", "gene_init"]


@dataclasses.dataclass
class GEARSConfig(ModelConfig):
    """The `[model]` section of a GEARS fine-tune (defaults: the reference's)."""

    name: str = "gears"
    hidden: int = 64  # hidden size of every embedding and MLP
    num_go_layers: int = 1  # SGConv layers on the GO graph
    num_coexpress_layers: int = 1  # SGConv layers on the co-expression graph
    pos_weight: float = 0.2  # weight of the co-expression GNN's embedding added to each gene's
    gamma: float = 2.0  # autofocus exponent: |y - y_hat|^(2 + gamma)
    direction_lambda: float = 0.1  # weight of the direction term
    direction: str = "mean"  # direction target: "mean" (sign of the condition's mean change vs tanh(k delta)) or "cell" (the reference's sign(y - ctrl) vs tanh(k (y_hat - ctrl)))
    direction_sharpness: float = 10.0  # k of the smooth sign tanh(k x)
    uncertainty: bool = False  # add the log-variance head and its Gaussian NLL
    uncertainty_reg: float = 1.0  # weight of the Gaussian NLL

    def __post_init__(self) -> None:
        self._check_name("gears")
        check_range("hidden", self.hidden, 1)
        check_range("num_go_layers", self.num_go_layers, 1)
        check_range("num_coexpress_layers", self.num_coexpress_layers, 1)
        check_range("pos_weight", self.pos_weight, 0.0)
        check_range("gamma", self.gamma, 0.0)
        check_range("direction_lambda", self.direction_lambda, 0.0)
        check_range("direction_sharpness", self.direction_sharpness, 0.0, lo_open=True)
        check_choice("direction", self.direction, DIRECTIONS)
        check_range("uncertainty_reg", self.uncertainty_reg, 0.0)


class MLP(nn.Sequential):
    """The reference's MLP: (Linear -> BatchNorm -> ReLU) per layer, no ReLU after the last.
    `forward(x, weight)` takes optional row weights for its BatchNorm layers (`weighted_bn`)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU()]
        super().__init__(*layers[:-1])

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            x = weighted_bn(layer, x, weight) if isinstance(layer, nn.BatchNorm1d) else layer(x)
        return x


class _WeightedBatchNorm(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta with count-weighted batch statistics;
    the backward in closed form (one pass, like torch's native BatchNorm backward):
        dx_i = r (g_i - w_i / n (sum_j g_j + xhat_i sum_j g_j xhat_j)),  g = dy * gamma."""

    @staticmethod
    def forward(ctx, x_NC, w_N, gamma_C, beta_C, eps):
        n = w_N.sum()
        mean_C = (w_N @ x_NC) / n
        centred_NC = x_NC - mean_C
        var_C = (w_N @ centred_NC.square()) / n
        r_C = torch.rsqrt(var_C + eps)
        xhat_NC = centred_NC.mul_(r_C)
        ctx.save_for_backward(xhat_NC, w_N, r_C, gamma_C)
        ctx.n = n
        return torch.addcmul(beta_C, xhat_NC, gamma_C), mean_C.detach(), var_C.detach()

    @staticmethod
    def backward(ctx, dy_NC, _dmean, _dvar):
        xhat_NC, w_N, r_C, gamma_C = ctx.saved_tensors
        g_NC = dy_NC * gamma_C
        s1_C, s2_C = g_NC.sum(0), (g_NC * xhat_NC).sum(0)
        coeff_N1 = (w_N / ctx.n)[:, None]
        dx_NC = (g_NC - coeff_N1 * torch.addcmul(s1_C, xhat_NC, s2_C)) * r_C
        return dx_NC, None, (dy_NC * xhat_NC).sum(0), dy_NC.sum(0), None


def weighted_bn(bn: nn.BatchNorm1d, x_NC: torch.Tensor, w_N: torch.Tensor | None) -> torch.Tensor:
    """`bn` applied to the rows of `x_NC`, each standing for `w_N` identical rows.

    Training: the batch statistics (biased variance for normalising, unbiased for the running
    variance, as torch computes them) of the multiset, so the result, its gradient and the
    running statistics equal `bn` on the rows repeated w times. Eval / no weights: `bn` itself."""
    if w_N is None or not bn.training:
        return bn(x_NC)
    w_N = w_N.to(x_NC.dtype)
    y_NC, mean_C, var_C = _WeightedBatchNorm.apply(x_NC, w_N, bn.weight, bn.bias, bn.eps)
    with torch.no_grad():
        n, m = w_N.sum(), bn.momentum
        bn.running_mean.mul_(1 - m).add_(m * mean_C)
        bn.running_var.mul_(1 - m).add_(m * var_C * n / (n - 1).clamp(min=1))
        bn.num_batches_tracked.add_(1)
    return y_NC


def _capped(weight: torch.Tensor) -> torch.Tensor:
    """Rows scaled to norm <= 1 (nn.Embedding's max_norm=True, without the in-place write)."""
    scale = weight.detach().norm(dim=-1, keepdim=True).clamp(min=1.0).reciprocal()
    return weight * scale


def _group_mean(per_cell_B: torch.Tensor, group_B: torch.Tensor) -> torch.Tensor:
    """Mean over cells within each group, then over groups (the reference's per-perturbation
    averaging)."""
    _, inverse = torch.unique(group_B, return_inverse=True)
    n = int(inverse.max()) + 1
    sums = torch.zeros(n, dtype=per_cell_B.dtype, device=per_cell_B.device)
    counts = torch.zeros(n, dtype=per_cell_B.dtype, device=per_cell_B.device)
    sums = sums.index_add(0, inverse, per_cell_B)
    counts = counts.index_add(0, inverse, torch.ones_like(per_cell_B))
    return (sums / counts).mean()


class GEARS(nn.Module):
    """The GEARS network over fixed graphs (module doc); forward takes a paired-task batch."""

    def __init__(self, cfg: GEARSConfig, n_genes: int, n_perts: int, *,
                 coexpress_edges: torch.Tensor, coexpress_weight: torch.Tensor,
                 go_edges: torch.Tensor, go_weight: torch.Tensor) -> None:
        super().__init__()
        from torch_geometric.nn import SGConv

        H, G = cfg.hidden, n_genes
        self.cfg, self.n_genes, self.n_perts = cfg, n_genes, n_perts
        # NOTE: graphs are persistent buffers: they travel with the weights into every export.
        # Copied: the arrays may be shared memory (Ray's object store, across ranks).
        self.register_buffer("coexpress_edges", coexpress_edges.long().clone())
        self.register_buffer("coexpress_weight", coexpress_weight.float().clone())
        self.register_buffer("go_edges", go_edges.long().clone())
        self.register_buffer("go_weight", go_weight.float().clone())
        self.gene_emb = nn.Embedding(G, H)
        self.pos_emb = nn.Embedding(G, H)
        self.pert_emb = nn.Embedding(n_perts, H)
        self.bn_emb = nn.BatchNorm1d(H)
        self.coexpress_layers = nn.ModuleList(SGConv(H, H, K=1)
                                              for _ in range(cfg.num_coexpress_layers))
        self.go_layers = nn.ModuleList(SGConv(H, H, K=1) for _ in range(cfg.num_go_layers))
        self.gene_mlp = MLP([H, H, H])
        self.pert_fuse = MLP([H, H, H])
        self.bn_pert_base = nn.BatchNorm1d(H)
        self.recovery = MLP([H, 2 * H, H])
        self.w1_GH = nn.Parameter(torch.empty(G, H))
        self.b1_G = nn.Parameter(torch.empty(G))
        self.cross_gene = MLP([G, H, H])
        self.w2_GH1 = nn.Parameter(torch.empty(G, H + 1))
        self.b2_G = nn.Parameter(torch.empty(G))
        for p in (self.w1_GH, self.w2_GH1):
            nn.init.xavier_normal_(p)
        for p in (self.b1_G, self.b2_G):  # the reference: xavier_normal_ on [G, 1] / [1, G]
            nn.init.normal_(p, std=(2.0 / (1 + G)) ** 0.5)
        self.logvar = MLP([H, 2 * H, H, 1]) if cfg.uncertainty else None

    @staticmethod
    def _gnn(x: torch.Tensor, layers: nn.ModuleList, edges: torch.Tensor,
             weight: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(layers):
            x = layer(x, edges, weight)
            if i < len(layers) - 1:
                x = x.relu()
        return x

    def _heads(self, pert_genes_BK: torch.Tensor, pert_signs_BK: torch.Tensor):
        """delta [B, G] (and log-variance [B, G] or None) of each cell's perturbation.

        Everything before the per-cell terms depends on the cell only through its perturbation,
        so it is computed once per distinct perturbation U in the batch, with BatchNorm weighted
        by how many cells share it (`weighted_bn`): the same values and gradients as computing
        every cell, at U/B of the cost (the reference computes every cell)."""
        cfg = self.cfg
        gene_GH = self.bn_emb(_capped(self.gene_emb.weight)).relu()
        pos_GH = self._gnn(_capped(self.pos_emb.weight), self.coexpress_layers,
                           self.coexpress_edges, self.coexpress_weight)
        gene_GH = self.gene_mlp(gene_GH + cfg.pos_weight * pos_GH)
        pert_PH = self._gnn(_capped(self.pert_emb.weight), self.go_layers, self.go_edges,
                            self.go_weight)
        valid_BK = pert_genes_BK >= 0
        signed_BK = torch.where(valid_BK, pert_signs_BK, torch.zeros_like(pert_signs_BK))
        # a perturbation is the set of (gene, sign): sorted so that order does not matter
        key_BK = torch.where(valid_BK, pert_genes_BK * 2 + (signed_BK < 0).long(),
                             torch.full_like(pert_genes_BK, -1))
        key_BK = key_BK.sort(dim=1).values
        uniq_UK, inverse_B, count_U = torch.unique(key_BK, dim=0, return_inverse=True,
                                                   return_counts=True)
        valid_UK = uniq_UK >= 0
        genes_UK = torch.where(valid_UK, uniq_UK // 2, torch.zeros_like(uniq_UK))
        signs_UK = torch.where(uniq_UK % 2 == 1, -1.0, 1.0).to(pert_PH.dtype) * valid_UK
        h_UH = (pert_PH[genes_UK] * signs_UK[..., None]).sum(1)
        perturbed_U = valid_UK.any(1)
        weight_U = count_U if self.training else None
        U = uniq_UK.shape[0]
        fused_UH = torch.zeros_like(h_UH)
        rows = perturbed_U.nonzero().squeeze(1)
        if rows.numel() > 0:
            w = None if weight_U is None else weight_U[rows]
            if w is not None and int(w.sum()) == 1:
                w = w * 2  # BatchNorm needs two rows; the reference duplicates a lone one too
            fused_UH = fused_UH.index_copy(0, rows, self.pert_fuse(h_UH[rows], w))
        H, G = cfg.hidden, self.n_genes
        w_UG = None if weight_U is None else weight_U.repeat_interleave(G)
        base = (gene_GH[None] + fused_UH[:, None, :]).reshape(U * G, H)
        base = weighted_bn(self.bn_pert_base, base, w_UG).relu()
        # gene-specific linear maps as one batched product over genes: [G, U, H] @ [G, H, 1]
        rec_GUH = self.recovery(base, w_UG).reshape(U, G, H).transpose(0, 1)
        out_UG = torch.bmm(rec_GUH, self.w1_GH[:, :, None])[..., 0].T + self.b1_G
        cross_UH = self.cross_gene(out_UG, weight_U)
        # w2_g . [d_g, c] = w2_g0 d_g + w2_g[1:] . c, without materialising [U, G, H + 1]
        delta_UG = (out_UG * self.w2_GH1[:, 0] + cross_UH @ self.w2_GH1[:, 1:].T) + self.b2_G
        logvar_UG = (self.logvar(base, w_UG).reshape(U, G) if self.logvar is not None
                     else None)
        return delta_UG[inverse_B], None if logvar_UG is None else logvar_UG[inverse_B]

    @torch.no_grad()
    def predict_delta(self, pert_genes_PK: torch.Tensor, pert_signs_PK: torch.Tensor,
                      covariate_P: torch.Tensor | None = None) -> torch.Tensor:
        """[P, G] predicted mean change of each perturbation (GEARS' delta does not depend on
        the control cell or its covariate, so `covariate_P` is not used)."""
        return self._heads(pert_genes_PK, pert_signs_PK)[0]

    def forward(self, inputs: dict[str, Any]) -> LossOutput:
        cfg = self.cfg
        if self.training and inputs[PERT_GENES].shape[0] < 2:
            raise ValueError("GEARS trains on batches of at least 2 cells (its BatchNorm "
                             "layers): set data.batch_size >= 2")
        delta_BG, logvar_BG = self._heads(inputs[PERT_GENES], inputs[PERT_SIGNS])
        x_BG, y_BG = inputs[X_CONTROL], inputs[X_TARGET]
        y_hat_BG = x_BG + delta_BG
        keep_BG = inputs[LOSS_GENES].to(y_hat_BG.dtype)
        n_B = keep_BG.sum(1).clamp(min=1.0)
        group_B = inputs[CONDITION]

        def per_pert(term_BG: torch.Tensor) -> torch.Tensor:
            return _group_mean((term_BG * keep_BG).sum(1) / n_B, group_B)

        err_BG = y_BG - y_hat_BG
        autofocus = per_pert(err_BG.abs().pow(2.0 + cfg.gamma))
        k = cfg.direction_sharpness
        if cfg.direction == "mean":
            direction = per_pert((inputs[DELTA_SIGN] - torch.tanh(k * delta_BG)) ** 2)
        else:
            ctrl_BG = inputs[CONTROL_MEAN]
            direction = per_pert((torch.sign(y_BG - ctrl_BG)
                                  - torch.tanh(k * (y_hat_BG - ctrl_BG))) ** 2)
        loss = autofocus + cfg.direction_lambda * direction
        metrics = {"autofocus": autofocus.detach(), "direction": direction.detach(),
                   "mse": per_pert(err_BG ** 2).detach()}
        if logvar_BG is not None:
            nll = per_pert(0.5 * (logvar_BG + err_BG ** 2 * torch.exp(-logvar_BG)))
            loss = loss + cfg.uncertainty_reg * nll
            metrics["nll"] = nll.detach()
        outputs = {"delta": delta_BG.detach()}
        if logvar_BG is not None:
            outputs["logvar"] = logvar_BG.detach()
        return LossOutput(loss=loss, metrics=metrics, outputs=outputs)


# --- the spec ----------------------------------------------------------------------------------
def build_gears(cfg: GEARSConfig, context: dict[str, Any]) -> GEARS:
    """The module over the fine-tune's readout genes, perturbation table and graphs."""
    genes, perts = context["genes"], context["pert_genes"]
    graphs = context["graphs"]
    model = GEARS(cfg, len(genes), len(perts),
                  coexpress_edges=torch.as_tensor(graphs["coexpress_edges"]),
                  coexpress_weight=torch.as_tensor(graphs["coexpress_weight"]),
                  go_edges=torch.as_tensor(graphs["go_edges"]),
                  go_weight=torch.as_tensor(graphs["go_weight"]))
    return model


def gene_init(table_genes: list[str], table_ND: np.ndarray, symbols: list[str], genes: list[str],
              hidden: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(init [G, hidden], mask [G], matched): a gene table's rows for the readout genes (matched
    by symbol, else by gene id), projected on its top `hidden` principal axes when wider and
    scaled to unit norm (the embeddings' norm cap); a table narrower than `hidden` is an error."""
    table_ND = np.asarray(table_ND, dtype=np.float64)
    if table_ND.shape[1] < hidden:
        raise ValueError(f"the gene table has {table_ND.shape[1]} dimensions, fewer than "
                         f"model.hidden={hidden}: set model.hidden <= {table_ND.shape[1]}")
    if table_ND.shape[1] > hidden:
        centred = table_ND - table_ND.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        table_ND = centred @ vt[:hidden].T
    index = {g: i for i, g in enumerate(table_genes)}
    rows = np.array([index.get(s, index.get(g, -1)) for s, g in zip(symbols, genes)])
    mask = rows >= 0
    init = np.zeros((len(genes), hidden), dtype=np.float32)
    chosen = table_ND[rows[mask]]
    init[mask] = chosen / np.maximum(np.linalg.norm(chosen, axis=1, keepdims=True), 1e-12)
    return init, mask, int(mask.sum())


def _init_from(cfg: GEARSConfig, parent: ModelSpec, exported: Exported, data: Any):
    """Gene embeddings from a registered model's gene table where genes match (`gene_init`)."""
    if parent.gene_table is None:
        raise ValueError(f"a {parent.name} model has no gene embeddings to initialise from")
    names, table = parent.gene_table(exported)
    init, mask, matched = gene_init(list(names), table, data.symbols, data.genes, cfg.hidden)
    if matched == 0:
        raise ValueError(f"none of the store's {len(data.genes)} genes is in its gene table of "
                         f"{len(names)} genes")
    return ({"gene_emb.weight": init}, {"gene_emb.weight": mask},
            {"init_genes_matched": f"{matched}/{len(data.genes)}"})


def export_gears(cfg: GEARSConfig, state_dict: dict[str, torch.Tensor],
                 context: dict[str, Any]) -> Exported:
    """Weights (graphs included), the `[model]` section, readout genes and perturbation table."""
    return export_paired("gears", cfg, state_dict, context,
                         pert_genes=list(context["context"]["pert_genes"]))


class GearsPredictor:
    """A pulled GEARS model as a `PerturbationPredictor` (readout genes = its genes)."""

    def __init__(self, exported: Exported) -> None:
        cfg = GEARSConfig.from_dict(exported.config["model_config"], path="model")
        t = exported.tensors
        self.genes = list(exported.vocab)
        self.pert_genes = list(exported.config["pert_genes"])
        self._index = {g: i for i, g in enumerate(self.pert_genes)}
        self.model = GEARS(cfg, len(self.genes), len(self.pert_genes),
                           coexpress_edges=t["coexpress_edges"],
                           coexpress_weight=t["coexpress_weight"], go_edges=t["go_edges"],
                           go_weight=t["go_weight"])
        self.model.load_state_dict(t)
        self.model.eval()

    def missing_genes(self, perturbations: Sequence[Any]) -> list[str]:
        return unrepresented(perturbations, self._index)

    def predict_delta(self, perturbations: Sequence[Any],
                      covariates: Sequence[str] | None = None) -> np.ndarray:
        genes, signs = encode_perturbations(perturbations, self._index)
        return self.model.predict_delta(torch.from_numpy(genes),
                                        torch.from_numpy(signs)).double().numpy()


def _paired_inputs(job: Any, context: dict[str, Any]):
    from pertscale.data.paired import PairedInputs

    return PairedInputs(context)


def _prepare(job: Any, task: Any) -> dict[str, Any]:
    from pertscale.data.priors import gears_context  # the priors are built from files

    return gears_context(job, task)


SPEC = ModelSpec(
    name="gears",
    debug_config="configs/gears_debug.toml",
    description="GEARS: co-expression and GO graph networks, signed compositional perturbations",
    config_cls=GEARSConfig,
    task="paired",
    predicts="delta",
    build=build_gears,
    make_inputs=_paired_inputs,
    prepare=_prepare,
    export=export_gears,
    load=GearsPredictor,
    init_from=_init_from,
)
