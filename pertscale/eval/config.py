"""Job configs of `pertscale fit genepert` (GenePertJobConfig) and `pertscale evaluate`
(EvaluateJobConfig); sections reuse the component configs they drive."""

from __future__ import annotations

import dataclasses

from pertscale.config import Config, ConfigError, check_range
from pertscale.data.perturbation import PerturbationConfig
from pertscale.data.splits import SplitConfig
from pertscale.eval.baselines import BASELINES, LinearConfig
from pertscale.eval.cv import GenePertConfig, RayConfig
from pertscale.tracking import TrackingConfig

__all__ = [
    "EmbeddingsConfig",
    "EvalDataConfig",
    "EvaluateJobConfig",
    "GenePertJobConfig",
    "ReportConfig",
]


@dataclasses.dataclass
class EvalDataConfig(Config):
    """The store to evaluate on, how to read its perturbations, and the split."""

    store_uri: str = ""  # cell store path or s3:// / gs:// URI (required at run time)
    perturbation: PerturbationConfig = dataclasses.field(default_factory=PerturbationConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)


@dataclasses.dataclass
class EmbeddingsConfig(Config):
    """A gene -> vector table file (see pertscale.data.embeddings for formats)."""

    path: str = ""  # .npz / .csv / .tsv / .parquet / .pkl table
    allow_pickle: bool = False  # allow GenePT's pickle (unpickling runs code: trusted files only)
    gene_column: str = ""  # gene column of a CSV / parquet table; "" = the first column


@dataclasses.dataclass
class ReportConfig(Config):
    """What the report compares and where it goes."""

    out_dir: str = ""  # report folder; "" = <storage root>/reports/<run name>-<UTC time>
    title: str = ""  # report heading; "" = from the job and the store
    baselines: list[str] = dataclasses.field(
        default_factory=lambda: ["no_change", "train_mean", "additive", "linear"])  # baselines beside the models
    linear: LinearConfig = dataclasses.field(default_factory=LinearConfig)  # the linear baseline
    n_plot_perturbations: int = 4  # perturbations in the predicted-vs-true DE plot per subgroup

    def __post_init__(self) -> None:
        for i, name in enumerate(self.baselines):
            if name not in BASELINES:
                raise ConfigError(f"baselines[{i}]={name!r} is not one of {sorted(BASELINES)}")
        if len(set(self.baselines)) != len(self.baselines):
            raise ConfigError(f"baselines {self.baselines} lists a baseline twice")
        check_range("n_plot_perturbations", self.n_plot_perturbations, 1)


@dataclasses.dataclass
class GenePertJobConfig(Config):
    """`pertscale fit genepert`: fit GenePert (alpha by Ray CV) on the training split, register
    it, and report it beside the baselines."""

    run_name: str = "genepert"  # MLflow run name and report folder prefix
    data: EvalDataConfig = dataclasses.field(default_factory=EvalDataConfig)
    embeddings: EmbeddingsConfig = dataclasses.field(default_factory=EmbeddingsConfig)
    genepert: GenePertConfig = dataclasses.field(default_factory=GenePertConfig)
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)


@dataclasses.dataclass
class EvaluateJobConfig(Config):
    """`pertscale evaluate`: registered models beside the baselines on a store and split."""

    run_name: str = "evaluate"  # MLflow run name and report folder prefix
    models: list[str] = dataclasses.field(
        default_factory=lambda: ["models:/pertscale-genepert@latest"])  # registry URIs to evaluate
    data: EvalDataConfig = dataclasses.field(default_factory=EvalDataConfig)
    embeddings: EmbeddingsConfig = dataclasses.field(default_factory=EmbeddingsConfig)  # "" path = the table a model was fitted with
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        for i, uri in enumerate(self.models):
            if not uri.startswith("models:/"):
                raise ConfigError(f"models[{i}]={uri!r} must be a registry URI models:/NAME@ALIAS "
                                  f"or models:/NAME/VERSION")
