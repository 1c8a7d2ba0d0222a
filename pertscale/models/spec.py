"""The model contract: one `ModelSpec` per model, named in one table (`pertscale.models.MODELS`).

A spec says, for one model (torchtitan's ModelSpec is the pattern):

    debug_config the job file in configs/ that runs it at its debug size (tests walk it)
    config_cls   its `[model]` section: a `ModelConfig` subclass, validated like every config
    task         what it learns from: "cells" (masked pretraining on cells; the loader +
                 tokenizer), "paired" (perturbed cells each paired with a control of the same
                 context) or "pseudobulk" (a closed-form fit on per-condition mean changes)
    build        trained models: (config, context) -> torch module whose forward returns
                 LossOutput; the context is the vocabulary (task "cells"; with a `prepare`,
                 its entries plus "vocab") or the task context dict (task "paired": genes,
                 perturbation table, priors; see pertscale.data.paired.build_paired_context)
    make_inputs  trained models: (job config, context) -> callable(loader batch, generator) ->
                 the module's input dict
    prepare      (job config, task data) -> the model's own context entries, computed once on
                 the driver ("report": facts logged as run parameters). Paired models (task data:
                 the PairedTask) must have one (e.g. GEARS' perturbation table and graphs); a
                 cells model may (task data: the open store; e.g. pathway_vae's pathway
                 selection), and then its context is those entries plus "vocab";
                 a paired module trained with validation conditions also has
                 predict_delta(pert_genes, pert_signs, covariate) (covariate: row of the
                 context's `covariates`); "loader_conditions" in its entries widens the cells
                 the loader draws beyond the training conditions (scgen: every control)
    fit          fitted models: (config, data, train conditions, features, parallel map) ->
                 a fitted object
    export       trained: (config, state dict, context) / fitted: (config, fitted, context) ->
                 `Exported` (tensors + JSON config + vocabulary)
    load         `Exported` -> a predictor (a `PerturbationPredictor`, or a cell embedder)
    gene_table   optional: `Exported` -> (gene names, vectors), the model's gene embeddings,
                 which a fit job can take as features (`init_from = "models:/..."`)
    init_from    optional, paired models: (config, parent spec, parent `Exported`, data) ->
                 (values, rows, report): initial parameter values taken from a registered
                 model (full shapes; `rows` = bool per row where only some rows are taken) and
                 what was taken (lineage tags); the worker writes them after building (the
                 context's "init_parent" holds the parent's kind, config and vocabulary, for
                 a model whose structure follows its parent's: scgen's pathway_vae encoder)

The worker loop, `fit`, `evaluate`, `pull`, `predict` and the registry read only specs. Adding a
model is one module exporting `SPEC`, one config file and one line in the table.

Architecture only: no ray, mlflow or file I/O here; parallel work comes in as a `map` callable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from pertscale.config import Config, ConfigError, check_choice

__all__ = [
    "PREDICTS",
    "TASKS",
    "Exported",
    "ModelConfig",
    "ModelSpec",
    "PerturbationPredictor",
    "encode_perturbations",
    "export_paired",
    "gene_columns",
    "get_spec",
    "unrepresented",
]

TASKS = ("cells", "paired", "pseudobulk")
PREDICTS = ("delta", "embedding")


@dataclasses.dataclass
class ModelConfig(Config):
    """Base of every `[model]` section: `name` picks the model and with it the section's class
    (`variant`), so `[model] name = "genepert"` is validated as GenePertConfig."""

    name: str = "scgpt"
    """The model, a key of pertscale.models.MODELS."""

    @classmethod
    def variant(cls, data: dict[str, Any]) -> type[ModelConfig]:
        """The config class of the model a `[model]` table names (default: this class's)."""
        from pertscale.models import MODELS

        default = next(f.default for f in dataclasses.fields(cls) if f.name == "name")
        name = data.get("name", default)
        check_choice("model.name", name, MODELS)
        return MODELS[name].config_cls

    def attention_shape(self) -> tuple[int, int]:
        """(self-attention layers over a cell's tokens, their width) for the attention term of
        the MFU (pertscale.training.flops); (0, 0) for a model without token attention."""
        return 0, 0

    def flash_kernels(self, layout: str) -> bool:
        """True when this model's attention over `layout` ("packed" | "padded") batches runs
        flash varlen kernels on CUDA, which take bf16/fp16 only."""
        return False

    def _check_name(self, expected: str) -> None:
        if self.name != expected:
            raise ConfigError(f"name={self.name!r}: this section is the {expected!r} model's")


@dataclasses.dataclass
class Exported:
    """What a model version holds: tensors (safetensors), a JSON config, a vocabulary.

    `config` always has "model" (the spec name) and "model_config" (the `[model]` section)."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    vocab: list[str]


class PerturbationPredictor(Protocol):
    """A pulled perturbation model: predicted mean change per readout gene."""

    genes: list[str]
    """Readout genes (columns of every prediction)."""

    def missing_genes(self, perturbations: Sequence[Any]) -> list[str]:
        """Perturbed genes (of `Perturbation` objects) the model cannot represent, sorted."""
        ...

    def predict_delta(self, perturbations: Sequence[Any],
                      covariates: Sequence[str] | None = None) -> np.ndarray:
        """[P, G] predicted change against control for each perturbation (in its covariate)."""
        ...


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How one model is configured, built or fitted, fed, exported and loaded (module doc)."""

    name: str
    description: str
    debug_config: str
    """The job file (under configs/) that runs this model at its debug size."""
    config_cls: type[ModelConfig]
    task: str
    predicts: str
    export: Callable[..., Exported]
    load: Callable[[Exported], Any]
    build: Callable[[Any, Sequence[str]], torch.nn.Module] | None = None
    make_inputs: Callable[[Any, Any], Callable[..., dict[str, Any]]] | None = None
    num_tokens: Callable[[dict[str, Any]], int] | None = None
    fit: Callable[..., Any] | None = None
    prepare: Callable[[Any, Any], dict[str, Any]] | None = None
    gene_table: Callable[[Exported], tuple[list[str], np.ndarray]] | None = None
    init_from: Callable[..., tuple[dict[str, Any], dict[str, Any], dict[str, str]]] | None = None

    def __post_init__(self) -> None:
        check_choice(f"{self.name}.task", self.task, TASKS)
        check_choice(f"{self.name}.predicts", self.predicts, PREDICTS)
        trained = self.build is not None and self.make_inputs is not None
        if self.task == "paired" and self.prepare is None:
            raise ValueError(f"model spec {self.name!r} trains on the paired task and needs "
                             f"prepare (its perturbation table)")
        if trained == (self.fit is not None):
            raise ValueError(f"model spec {self.name!r} needs either build + make_inputs "
                             f"(trained on the engine) or fit (closed form), not both or neither")

    @property
    def trained(self) -> bool:
        """True for models trained on the DeepSpeed engine; False for closed-form fits."""
        return self.fit is None


def encode_perturbations(perturbations: Sequence[Any], index: dict[str, int]
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(genes int64 [P, K], signs float32 [P, K]) of `Perturbation` objects as rows of a
    model's perturbation table `index` (gene -> row), padded with -1 / 0; every gene must be
    in `index` (a predictor's `missing_genes` says which are not)."""
    k = max([len(p.genes) for p in perturbations] + [1])
    genes = np.full((len(perturbations), k), -1, dtype=np.int64)
    signs = np.zeros((len(perturbations), k), dtype=np.float32)
    for i, p in enumerate(perturbations):
        for j, (g, s) in enumerate(zip(p.genes, p.signs)):
            genes[i, j], signs[i, j] = index[g], s
    return genes, signs


def export_paired(name: str, cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                  context: dict[str, Any], **extra: Any) -> Exported:
    """A paired model's export: weights (its buffers included), the `[model]` section, the
    readout genes (vocab) and symbols, the training facts, and the model's own `extra` entries."""
    task = context["context"]
    return Exported(tensors=dict(state_dict),
                    config={"model": name, "model_config": cfg.to_dict(),
                            "gene_symbols": list(task["symbols"]), **extra,
                            "training": dict(context.get("training") or {})},
                    vocab=list(task["genes"]))


def gene_columns(genes: Sequence[str], symbols: Sequence[str], columns: Sequence[str],
                 model: str) -> np.ndarray:
    """Index in `genes` of each column (a gene id, else a symbol); an unknown column is an
    error naming the `model`."""
    index = {g: i for i, g in enumerate(genes)}
    index.update({s: i for i, s in enumerate(symbols) if s not in index})
    unknown = [c for c in columns if c not in index]
    if unknown:
        raise ValueError(f"{len(unknown)} column(s) are not genes of this {model} model's "
                         f"vocabulary, e.g. {unknown[:5]}")
    return np.array([index[c] for c in columns], dtype=np.int64)


def unrepresented(perturbations: Sequence[Any], index: dict[str, int]) -> list[str]:
    """Perturbed genes not in `index` and treatments (a gene-table model has no treatments),
    sorted: a paired predictor's `missing_genes`."""
    missing = {g for p in perturbations for g in p.genes if g not in index}
    return sorted(missing | {t for p in perturbations for t in p.treatments})


def get_spec(name: str) -> ModelSpec:
    """The spec named `name`; an unknown name lists the models."""
    from pertscale.models import MODELS

    if name not in MODELS:
        raise ValueError(f"model {name!r} is not one of {sorted(MODELS)}")
    return MODELS[name]
