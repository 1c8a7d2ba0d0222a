"""scGPT: masked binned-value modelling over a cell's expressed genes.

Legend: B cells, L padded length, T packed tokens, C d_model, H heads, D head dim, F d_ff.
Token tensors are [B, L] (padded) or [T] (packed); hidden states [B, L, C] or [T, C].

Follows bowang-lab/scGPT `scgpt/model/model.py`: GeneEncoder (embedding + LayerNorm), a value
encoder (continuous: Linear -> ReLU -> Linear -> LayerNorm; or category: bin embedding +
LayerNorm), summed, optional condition embedding added to every token, a transformer encoder
without position encoding (post-norm by default, as torch's TransformerEncoderLayer that scGPT
uses), ExprDecoder (MLP -> value per token, MSE on masked positions) and the MVC/GEPC decoder
("inner product": sigmoid(Linear(gene_emb)) -> Linear -> dot with the <cls> cell embedding, MSE
on masked positions). Loss = MLM MSE + gepc_weight * GEPC MSE.

Generative mode (scGPT's generation attention mask): masked ("unknown") genes attend to the
known genes and to themselves; known genes attend to known genes only.
NOTE: dropout applies to embeddings and to the attention / feed-forward outputs, not to the
attention probabilities (the flash varlen kernels run with dropout 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pertscale.config import ConfigError, check_choice, check_range
from pertscale.constants import (
    CONDITION_IDS,
    CU_SEQLENS,
    GENE_IDS,
    MASKED,
    MAX_SEQLEN,
    PAD_ID,
    PADDING_MASK,
    TARGET_VALUES,
    VALUE_IDS,
)
from pertscale.models.attention import (
    ATTENTION_BACKENDS,
    AttentionPlan,
    BackendChoice,
    attention,
    plan_attention,
)
from pertscale.models.output import LossOutput
from pertscale.models.spec import Exported, ModelConfig, ModelSpec, gene_columns

__all__ = ["SCGPT_FLAVORS", "SPEC", "ScGPT", "ScGPTConfig", "ScGPTEmbedder", "ScGPTSize"]


@dataclasses.dataclass(frozen=True)
class ScGPTSize:
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int


SCGPT_FLAVORS: dict[str, ScGPTSize] = {
    "debug": ScGPTSize(d_model=64, n_layers=2, n_heads=4, d_ff=128),
    "small": ScGPTSize(d_model=512, n_layers=12, n_heads=8, d_ff=512),  # scGPT's published size
}

VALUE_ENCODERS = ("continuous", "category")


@dataclasses.dataclass
class ScGPTConfig(ModelConfig):
    """The `[model]` section of scgpt."""

    name: str = "scgpt"                # model name, a key of MODELS
    flavor: str = "debug"              # size preset: debug (CPU, seconds) or small (scGPT's size)
    d_model: int = 0                   # override the flavor's width (0 = flavor default)
    n_layers: int = 0                  # override the flavor's depth (0 = flavor default)
    n_heads: int = 0                   # override the flavor's heads (0 = flavor default)
    d_ff: int = 0                      # override the flavor's feed-forward width (0 = default)
    attention: str = "auto"            # auto | reference | sdpa | varlen | flash_attn (see below)
    generative: bool = False           # scGPT generative mask: unknown genes see known + self
    dropout: float = 0.0               # dropout on embeddings and sublayer outputs (scGPT: 0.2)
    n_conditions: int = 0              # size of the condition embedding (0 = none)
    gepc_weight: float = 1.0           # weight of the GEPC/MVC loss next to the masked-value MSE
    value_encoder: str = "continuous"  # continuous (MLP on the bin) | category (bin embedding)
    n_bins: int = 51                   # value bins incl. bin 0 (must match the tokenizer)
    norm_first: bool = False           # pre-norm layers (scGPT: post-norm)

    def __post_init__(self) -> None:
        self._check_name("scgpt")
        check_choice("flavor", self.flavor, SCGPT_FLAVORS)
        check_choice("attention", self.attention, ["auto", *ATTENTION_BACKENDS])
        check_choice("value_encoder", self.value_encoder, VALUE_ENCODERS)
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "n_conditions"):
            check_range(name, getattr(self, name), 0)
        check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_range("gepc_weight", self.gepc_weight, 0.0)
        check_range("n_bins", self.n_bins, 2)
        size = self.size()
        if size.d_model % size.n_heads:
            raise ConfigError(f"d_model={size.d_model} is not divisible by n_heads={size.n_heads}")

    def attention_shape(self) -> tuple[int, int]:
        size = self.size()
        return size.n_layers, size.d_model

    def flash_kernels(self, layout: str) -> bool:
        return self.attention in ("varlen", "flash_attn") or (self.attention == "auto"
                                                               and layout == "packed")

    def size(self) -> ScGPTSize:
        """The flavor's sizes with the non-zero overrides applied."""
        base = SCGPT_FLAVORS[self.flavor]
        return ScGPTSize(**{f: getattr(self, f) or getattr(base, f)
                            for f in ("d_model", "n_layers", "n_heads", "d_ff")})


class ContinuousValueEncoder(nn.Module):
    def __init__(self, d_model: int, dropout: float, max_value: float = 512.0):
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.max_value = max_value

    def forward(self, value_ids: torch.Tensor) -> torch.Tensor:
        x = value_ids.to(self.linear1.weight.dtype).clamp(max=self.max_value).unsqueeze(-1)
        x = self.linear2(F.relu(self.linear1(x)))
        return self.dropout(self.norm(x))


class CategoryValueEncoder(nn.Module):
    """One embedding per bin; PAD_VALUE (-2) -> row 0 (zero), MASK_VALUE (-1) -> row 1."""

    def __init__(self, n_bins: int, d_model: int):
        super().__init__()
        self.embedding = nn.Embedding(n_bins + 2, d_model, padding_idx=0)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, value_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embedding(value_ids + 2))


class EncoderLayer(nn.Module):
    """Self-attention + ReLU feed-forward, post-norm (scGPT) or pre-norm."""

    def __init__(self, size: ScGPTSize, dropout: float, norm_first: bool):
        super().__init__()
        C = size.d_model
        self.n_heads = size.n_heads
        self.qkv = nn.Linear(C, 3 * C)
        self.out_proj = nn.Linear(C, C)
        self.ff1 = nn.Linear(C, size.d_ff)
        self.ff2 = nn.Linear(size.d_ff, C)
        self.norm1 = nn.LayerNorm(C)
        self.norm2 = nn.LayerNorm(C)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def _attend(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        # x is [B, L, C] or [T, C]; heads split the last dim either way.
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).unbind(-3)
        out = attention(q, k, v, plan=plan)
        return self.dropout(self.out_proj(out.flatten(-2)))

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.ff2(self.dropout(F.relu(self.ff1(x)))))

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """`plan`: the batch's attention plan (`plan_attention`), shared by every layer."""
        if self.norm_first:
            x = x + self._attend(self.norm1(x), plan)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attend(x, plan))
        return self.norm2(x + self._feed_forward(x))


class ExprDecoder(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(d_model, d_model), nn.LeakyReLU(),
                                nn.Linear(d_model, d_model), nn.LeakyReLU(),
                                nn.Linear(d_model, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h).squeeze(-1)


class MVCDecoder(nn.Module):
    """GEPC: predict each gene's value from the cell embedding queried by the gene embedding."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.W = nn.Linear(d_model, d_model, bias=False)

    def forward(self, cell_emb_tok: torch.Tensor, gene_emb: torch.Tensor) -> torch.Tensor:
        query = torch.sigmoid(self.gene2query(gene_emb))
        return (self.W(query) * cell_emb_tok).sum(-1)


class GeneEmbedding(nn.Embedding):
    """Gene token embedding initialised as scGPT's init_weights: uniform(-0.1, 0.1), <pad> zero.

    NOTE: the init lives in `reset_parameters` (called by nn.Embedding.__init__) so that it runs
    while the module is built: under deepspeed.zero.Init a weight is partitioned as soon as its
    module exists, and a parent module cannot write into it afterwards."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__(vocab_size, d_model, padding_idx=PAD_ID)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.uniform_(-0.1, 0.1)
            self.weight[PAD_ID].zero_()


class ScGPT(nn.Module):
    """forward(token batch) -> LossOutput(loss, metrics {mlm_mse, gepc_mse}, counts {n_masked},
    outputs {predictions (layout of the batch), gepc_predictions, cell_emb [B, C]})."""

    def __init__(self, size: ScGPTSize, vocab_size: int, *, attention_backend: str = "auto",
                 generative: bool = False, dropout: float = 0.0, n_conditions: int = 0,
                 gepc_weight: float = 1.0, value_encoder: str = "continuous", n_bins: int = 51,
                 norm_first: bool = False):
        super().__init__()
        if size.d_model % size.n_heads:
            raise ValueError(f"d_model={size.d_model} is not divisible by n_heads={size.n_heads}")
        if value_encoder not in ("continuous", "category"):
            raise ValueError(f"value_encoder={value_encoder!r} is not one of "
                             f"['continuous', 'category']")
        C = size.d_model
        self.size = size
        self.backend = BackendChoice(attention_backend, "scgpt")
        self.generative = generative
        self.gepc_weight = gepc_weight
        self.gene_embedding = GeneEmbedding(vocab_size, C)
        self.gene_norm = nn.LayerNorm(C)
        self.value_encoder = (ContinuousValueEncoder(C, dropout) if value_encoder == "continuous"
                              else CategoryValueEncoder(n_bins, C))
        self.condition_embedding = nn.Embedding(n_conditions, C) if n_conditions else None
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(EncoderLayer(size, dropout, norm_first)
                                    for _ in range(size.n_layers))
        self.final_norm = nn.LayerNorm(C) if norm_first else nn.Identity()
        self.expr_decoder = ExprDecoder(C)
        self.mvc_decoder = MVCDecoder(C)

    def forward(self, batch: dict) -> LossOutput:
        gene_ids, value_ids = batch[GENE_IDS], batch[VALUE_IDS]
        masked = batch[MASKED]
        packed = CU_SEQLENS in batch
        if packed:
            cu_seqlens = batch[CU_SEQLENS]
            attn_kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": int(batch[MAX_SEQLEN])}
            cls_idx = cu_seqlens[:-1].long()
            lengths_B = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            valid = torch.ones_like(masked)
        else:
            padding_mask_BL = batch[PADDING_MASK]
            attn_kwargs = {"padding_mask": padding_mask_BL}
            valid = ~padding_mask_BL
        if self.generative:
            attn_kwargs["known"] = ~masked & valid
        backend = self.backend("packed" if packed else "padded", gene_ids.device)
        plan = plan_attention(backend, **attn_kwargs)  # once per batch, shared by every layer

        gene_emb = self.gene_norm(self.gene_embedding(gene_ids))
        h = gene_emb + self.value_encoder(value_ids)
        if self.condition_embedding is not None:
            if CONDITION_IDS not in batch:
                raise ValueError(f"model has n_conditions={self.condition_embedding.num_embeddings}"
                                 f" but the batch has no {CONDITION_IDS!r}")
            cond_BC = self.condition_embedding(batch[CONDITION_IDS])
            h = h + (torch.repeat_interleave(cond_BC, lengths_B, dim=0, output_size=h.shape[0])
                     if packed else cond_BC[:, None, :])
        h = self.dropout(h)
        for layer in self.layers:
            h = layer(h, plan)
        h = self.final_norm(h)

        cell_emb_BC = h[cls_idx] if packed else h[:, 0]
        cell_emb_tok = (torch.repeat_interleave(cell_emb_BC, lengths_B, dim=0,
                                                output_size=h.shape[0])
                        if packed else cell_emb_BC[:, None, :])
        pred = self.expr_decoder(h)
        gepc_pred = self.mvc_decoder(cell_emb_tok, gene_emb)

        # NOTE: losses in fp32 whatever the compute dtype (bf16 sums over many tokens drift).
        acc = torch.promote_types(pred.dtype, torch.float32)
        target = batch[TARGET_VALUES].to(acc)
        n_masked = masked.sum()
        denom = n_masked.clamp(min=1).to(acc)
        mlm_mse = ((pred.to(acc) - target) ** 2).masked_fill(~masked, 0.0).sum() / denom
        gepc_mse = ((gepc_pred.to(acc) - target) ** 2).masked_fill(~masked, 0.0).sum() / denom
        loss = mlm_mse + self.gepc_weight * gepc_mse
        return LossOutput(
            loss=loss,
            metrics={"mlm_mse": mlm_mse.detach(), "gepc_mse": gepc_mse.detach()},
            counts={"n_masked": n_masked.detach()},
            outputs={"predictions": pred.detach(), "gepc_predictions": gepc_pred.detach(),
                     "cell_emb": cell_emb_BC.detach()},
        )


# --- the spec ----------------------------------------------------------------------------------
def build_scgpt(cfg: ScGPTConfig, vocab: Sequence[str]) -> ScGPT:
    """The module for a vocabulary of special tokens + genes."""
    if len(vocab) < 4:
        raise ValueError(f"vocabulary of {len(vocab)} tokens must cover the 3 special tokens "
                         f"and >= 1 gene")
    return ScGPT(cfg.size(), len(vocab), attention_backend=cfg.attention,
                 generative=cfg.generative, dropout=cfg.dropout, n_conditions=cfg.n_conditions,
                 gepc_weight=cfg.gepc_weight, value_encoder=cfg.value_encoder, n_bins=cfg.n_bins,
                 norm_first=cfg.norm_first)


def _tokenizer(job: Any, vocab: Sequence[str]):
    from pertscale.data.tokenizer import Tokenizer

    return Tokenizer(job.tokenizer, vocab)


def _num_tokens(inputs: dict[str, Any]) -> int:
    """Real (non-pad) tokens of a token batch, in either layout."""
    if CU_SEQLENS in inputs:
        return int(inputs[GENE_IDS].numel())
    return int((~inputs[PADDING_MASK]).sum())


def export_scgpt(cfg: ScGPTConfig, state_dict: dict[str, torch.Tensor],
                 context: dict[str, Any]) -> Exported:
    """Weights, the `[model]` and `[tokenizer]` sections, the vocabulary and gene symbols."""
    return Exported(tensors=dict(state_dict),
                    config={"model": "scgpt", "model_config": cfg.to_dict(),
                            "tokenizer": dict(context["job"]["tokenizer"]),
                            "gene_symbols": list(context.get("gene_symbols") or [])},
                    vocab=list(context["vocab"]))


class ScGPTEmbedder:
    """A pulled scgpt: cells (expression over its vocabulary's genes) -> <cls> cell embeddings."""

    def __init__(self, exported: Exported) -> None:
        from pertscale.data.tokenizer import TokenizerConfig

        cfg = ScGPTConfig.from_dict(exported.config["model_config"], path="model")
        self.vocab = list(exported.vocab)
        self.genes = self.vocab[3:]
        self.symbols = list(exported.config.get("gene_symbols") or self.genes)
        tok = {**exported.config["tokenizer"], "mask_ratio": 0.0}
        self.tokenizer_cfg = TokenizerConfig.from_dict(tok, path="tokenizer")
        self.model = build_scgpt(cfg, self.vocab)
        self.model.load_state_dict(exported.tensors)
        self.model.eval()
        self.dim = self.model.size.d_model

    def gene_columns(self, columns: Sequence[str]) -> np.ndarray:
        """Gene index of each column (gene id or symbol); an unknown column is an error."""
        return gene_columns(self.genes, self.symbols, columns, "scgpt")

    @torch.no_grad()
    def embed(self, x_CG: np.ndarray, columns: Sequence[str], seed: int = 0) -> np.ndarray:
        """[cells, d_model] cell embeddings of dense expression `x_CG` over `columns`."""
        import scipy.sparse as sp

        from pertscale.constants import INDICES, INDPTR, OBS, VALUES
        from pertscale.data.tokenizer import Tokenizer

        genes = self.gene_columns(columns)
        m = sp.csr_matrix(np.asarray(x_CG, dtype=np.float32))
        # NOTE: column order need not follow the vocabulary; the tokenizer sorts each row.
        batch = {INDPTR: m.indptr.astype(np.int64), INDICES: genes[m.indices].astype(np.int32),
                 VALUES: m.data, OBS: {}}
        tokens = Tokenizer(self.tokenizer_cfg, self.vocab)(
            batch, generator=torch.Generator().manual_seed(seed))
        return self.model(tokens).outputs["cell_emb"].double().numpy()


def scgpt_gene_table(exported: Exported) -> tuple[list[str], np.ndarray]:
    """The gene-embedding table (gene tokens only), keyed by gene symbol where known."""
    names = list(exported.config.get("gene_symbols") or exported.vocab[3:])
    weight = exported.tensors["gene_embedding.weight"][3:].double().numpy()
    return names, weight


SPEC = ModelSpec(
    name="scgpt",
    debug_config="configs/scgpt_debug.toml",
    description="scGPT-style masked binned-value transformer, pretrained on cells",
    config_cls=ScGPTConfig,
    task="cells",
    predicts="embedding",
    build=build_scgpt,
    make_inputs=_tokenizer,
    num_tokens=_num_tokens,
    export=export_scgpt,
    load=ScGPTEmbedder,
    gene_table=scgpt_gene_table,
)
