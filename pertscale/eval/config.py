"""Job configs of `pertscale fit` (FitJobConfig: any fitted model of the spec table) and
`pertscale evaluate` (EvaluateJobConfig); sections reuse the component configs they drive."""

from __future__ import annotations

import dataclasses

from pertscale.config import Config, ConfigError, check_range
from pertscale.data.perturbation import PerturbationConfig
from pertscale.data.splits import SplitConfig
from pertscale.eval.baselines import BASELINES, LinearConfig
from pertscale.eval.cv import RayConfig
from pertscale.eval.metrics import DEFAULT_FAMILIES, METRIC_FAMILIES
from pertscale.models import ModelConfig, get_spec
from pertscale.models.genepert import GenePertConfig
from pertscale.tracking import TrackingConfig

__all__ = [
    "EmbeddingsConfig",
    "EvalDataConfig",
    "EvaluateJobConfig",
    "FitJobConfig",
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
    allow_pickle: bool = False  # allow GenePT's pickle (unpickling runs code: trusted files only; only ever read from your own config file)
    gene_column: str = ""  # gene column of a CSV / parquet table; "" = the first column


@dataclasses.dataclass
class ReportConfig(Config):
    """What the report compares and where it goes."""

    out_dir: str = ""  # report folder; "" = <storage root>/reports/<run name>-<UTC time>
    title: str = ""  # report heading; "" = from the job and the store
    metrics: list[str] = dataclasses.field(
        default_factory=lambda: list(DEFAULT_FAMILIES))  # families: gears, cell-eval, systema, scgen
    baselines: list[str] = dataclasses.field(
        default_factory=lambda: ["no_change", "train_mean", "additive", "matching_mean",
                                 "linear"])  # baselines beside the models
    linear: LinearConfig = dataclasses.field(default_factory=LinearConfig)  # the linear baseline
    n_plot_perturbations: int = 4  # perturbations in the predicted-vs-true DE plot per subgroup

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ConfigError(f"metrics is empty: list some of {list(METRIC_FAMILIES)}")
        for i, family in enumerate(self.metrics):
            if family not in METRIC_FAMILIES:
                raise ConfigError(f"metrics[{i}]={family!r} is not one of "
                                  f"{list(METRIC_FAMILIES)}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ConfigError(f"metrics {self.metrics} lists a family twice")
        for i, name in enumerate(self.baselines):
            if name not in BASELINES:
                raise ConfigError(f"baselines[{i}]={name!r} is not one of {sorted(BASELINES)}")
        if len(set(self.baselines)) != len(self.baselines):
            raise ConfigError(f"baselines {self.baselines} lists a baseline twice")
        check_range("n_plot_perturbations", self.n_plot_perturbations, 1)


@dataclasses.dataclass
class FitJobConfig(Config):
    """`pertscale fit NAME`: fit a closed-form model (e.g. GenePert, alpha by Ray CV) on the
    training split, register it, and report it beside the baselines. Its gene features come
    from `embeddings.path` or from the gene table of the registered model `init_from`."""

    run_name: str = "fit"  # MLflow run name and report folder prefix
    init_from: str = ""  # models:/NAME@ALIAS whose gene embeddings are the features ("" = embeddings.path)
    data: EvalDataConfig = dataclasses.field(default_factory=EvalDataConfig)
    embeddings: EmbeddingsConfig = dataclasses.field(default_factory=EmbeddingsConfig)
    model: ModelConfig = dataclasses.field(default_factory=GenePertConfig)  # the model: name picks its spec
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        spec = get_spec(self.model.name)
        if spec.trained:
            raise ConfigError(f"model.name={spec.name!r} is trained on the engine, not fitted: "
                              f"run `pertscale pretrain` (task {spec.task!r})")
        if self.init_from and not self.init_from.startswith("models:/"):
            raise ConfigError(f"init_from={self.init_from!r} must be a registry URI "
                              f"models:/NAME@ALIAS or models:/NAME/VERSION")
        if self.init_from and self.embeddings.path:
            raise ConfigError(f"init_from={self.init_from!r} and embeddings.path="
                              f"{self.embeddings.path!r} both give the gene features; set one")


@dataclasses.dataclass
class EvaluateJobConfig(Config):
    """`pertscale evaluate`: registered models beside the baselines on a store and split."""

    run_name: str = "evaluate"  # MLflow run name and report folder prefix
    models: list[str] = dataclasses.field(
        default_factory=lambda: ["models:/pertscale-genepert@latest"])  # registry URIs to evaluate
    baselines_only: bool = False  # report the baselines alone (needs models = [])
    data: EvalDataConfig = dataclasses.field(default_factory=EvalDataConfig)
    embeddings: EmbeddingsConfig = dataclasses.field(default_factory=EmbeddingsConfig)  # for the linear baseline's table; "" = the first model's gene table
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not self.models and not self.baselines_only:
            raise ConfigError("models is empty: list models:/ URIs to evaluate, or set "
                              "baselines_only = true to report the baselines alone")
        if self.models and self.baselines_only:
            raise ConfigError(f"baselines_only = true needs models = [] (got {self.models})")
        if self.baselines_only and not self.report.baselines:
            raise ConfigError("baselines_only = true needs report.baselines to list some")
        for i, uri in enumerate(self.models):
            if not uri.startswith("models:/"):
                raise ConfigError(f"models[{i}]={uri!r} must be a registry URI models:/NAME@ALIAS "
                                  f"or models:/NAME/VERSION")
