"""Model architectures and their specs, chosen by name from one table, `MODELS`.

Every spec (pertscale.models.spec.ModelSpec) says how its model is configured, built or fitted,
fed, exported and loaded; the worker loop, fit, evaluate, pull, predict and the registry read
only specs. Adding a model: one module exporting `SPEC`, one config file, one line below.
"""

from __future__ import annotations

from pertscale.models import gears, genepert, pathway_vae, scgen, scgpt, scgpt_perturb
from pertscale.models.attention import ATTENTION_BACKENDS, attention
from pertscale.models.output import LossOutput
from pertscale.models.scgpt import SCGPT_FLAVORS, ScGPT, ScGPTConfig, ScGPTSize
from pertscale.models.spec import Exported, ModelConfig, ModelSpec, get_spec

__all__ = [
    "ATTENTION_BACKENDS",
    "MODELS",
    "SCGPT_FLAVORS",
    "Exported",
    "LossOutput",
    "ModelConfig",
    "ModelSpec",
    "ScGPT",
    "ScGPTConfig",
    "ScGPTSize",
    "attention",
    "get_spec",
]

# model name -> spec: the one table of models.
MODELS: dict[str, ModelSpec] = {
    "scgpt": scgpt.SPEC,
    "genepert": genepert.SPEC,
    "gears": gears.SPEC,
    "scgpt_perturb": scgpt_perturb.SPEC,
    "pathway_vae": pathway_vae.SPEC,
    "scgen": scgen.SPEC,
}
