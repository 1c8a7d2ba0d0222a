"""The model table: every spec validates its debug config, runs one step (or one fit) on
simulated data, and its export reloads to equal weights and equal predictions; models/ stays
architecture-only."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import pertscale.models
from pertscale.config import ConfigError, load_config
from pertscale.models import MODELS, LossOutput, ScGPTConfig, get_spec

torch.set_num_threads(2)
MODELS_DIR = Path(pertscale.models.__file__).parent
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A small simulated screen: its store, perturbation data and split, gene embeddings."""
    from pertscale.data.embeddings import load_embeddings
    from pertscale.data.perturbation import PerturbationConfig, load_perturbation_data
    from pertscale.data.splits import simulation_split
    from pertscale.data.synthetic import SimulatorConfig, write_dataset
    from pertscale.store import open_store

    out = tmp_path_factory.mktemp("sim")
    cfg = SimulatorConfig(n_genes=200, n_cells=2000, n_cell_types=2, n_batches=1,
                          n_single_perturbations=30, n_double_perturbations=6, seed=5)
    write_dataset(cfg, out / "files", store_uri=str(out / "store"))
    store = open_store(str(out / "store"))
    pcfg = PerturbationConfig(covariate_column="cell_type", sign_column="perturbation_type",
                              sign_values={"control": 1, "activation": 1, "inhibition": -1})
    data = load_perturbation_data(store, pcfg)
    return {"store": str(out / "store"), "files": out / "files", "pcfg": pcfg,
            "data": data, "split": simulation_split(data, seed=1),
            "embeddings": load_embeddings(out / "files" / "gene_embeddings.npz")}


def _cells_step(spec, job, simulated):
    """One optimizer step of a "cells" model on a loader batch; returns (module, inputs, out)."""
    from pertscale.data.loader import CellLoader

    loader = CellLoader(simulated["store"], batch_size=16, block_size=16, rank=0, world_size=1,
                        seed=0)
    vocab = context = loader.store.vocab.tokens
    if spec.prepare is not None:  # pathway_vae: pathway tokens from the simulator's gene sets
        files = simulated["files"]
        job = job.replace(model=job.model.replace(pathways=job.model.pathways.replace(
            gmt=str(files / "gene_sets.gmt"), dag_edges=str(files / "go_dag_edges.tsv"))))
        prepared = dict(spec.prepare(job, loader.store))
        assert prepared.pop("report")["pathways"] >= 1
        context = {**prepared, "vocab": vocab}
    torch.manual_seed(0)
    module = spec.build(job.model, context)
    inputs = spec.make_inputs(job, context)(next(iter(loader)),
                                            generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    out = module(inputs)
    out.loss.backward()
    unused = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"parameters outside the loss: {unused}"
    opt.step()
    context = {"job": job.to_dict(), "vocab": vocab, "context": context,
               "gene_symbols": loader.store.var["gene_symbol"].astype(str).tolist()}
    return module, inputs, out, context


def _paired_step(spec, job, simulated, tmp_path):
    """One optimizer step of a "paired" model on a paired batch."""
    from pertscale.data.paired import PairedLoader, PairedTask, build_paired_context
    from pertscale.store import open_store

    job = job.replace(data=job.data.replace(store_uri=simulated["store"], batch_size=16,
                                            perturbation=simulated["pcfg"]),
                      priors=job.priors.replace(
                          go_path=str(simulated["files"] / "go_annotations.tsv"),
                          cache_dir=str(tmp_path / "cache")))
    from pertscale.data.splits import build_split

    split = (simulated["split"] if job.data.split.kind == "simulation"
             else build_split(simulated["data"], job.data.split))
    task = PairedTask(open_store(simulated["store"]), simulated["data"], split, job.data)
    extra = dict(spec.prepare(job, task))
    extra.pop("report", None)
    context = build_paired_context(task, extra.pop("pert_genes"), extra)
    loader = PairedLoader(job.data, context.get("loader_conditions")
                          or context["train"]["conditions"])
    torch.manual_seed(0)
    module = spec.build(job.model, context)
    inputs = spec.make_inputs(job, context)(next(iter(loader)))
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    out = module(inputs)
    out.loss.backward()
    unused = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"parameters outside the loss: {unused}"
    opt.step()
    return module, inputs, out, {"job": job.to_dict(), "context": context, "training": {},
                                 "split": split}


def _predictions(spec, predictor, simulated, job_split=None):
    """What the predictor returns on simulated inputs of its kind."""
    data, split = simulated["data"], simulated["split"]
    if spec.predicts == "delta":
        if job_split is not None:
            split = job_split
        conds = next(c for c in split.test.values() if c)[:5] + split.train[:3]
        perts = [data.perturbation(c) for c in conds]
        return predictor.predict_delta(perts, [data.conditions.at[c, "covariate"] for c in conds])
    from pertscale.store import open_store

    store = open_store(simulated["store"])
    x = store.read_csr(0, 8).toarray()
    return predictor.embed(x, [str(g) for g in store.var.index])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_spec_steps_or_fits_exports_and_reloads(name, simulated, tmp_path):
    from pertscale.models.genepert import serial_map
    from pertscale.tracking import load_model_dir, save_model_dir

    spec = MODELS[name]
    job = load_config(REPO / spec.debug_config)
    assert job.model.name == name and isinstance(job.model, spec.config_cls)
    if spec.trained:
        step = _cells_step if spec.task == "cells" else _paired_step
        args = (tmp_path,) if spec.task == "paired" else ()
        module, _, out, context = step(spec, job, simulated, *args)
        job = type(job).from_dict(context["job"])  # with the step's data / prior paths
        assert isinstance(out, LossOutput) and torch.isfinite(out.loss)
        for value in (*out.metrics.values(), *out.counts.values()):
            assert not value.requires_grad
        exported = spec.export(job.model, module.state_dict(), context)
    else:
        data, split = simulated["data"], simulated["split"]
        fitted = spec.fit(job.model, data, split.train, features=simulated["embeddings"],
                          map_fn=serial_map)
        exported = spec.export(job.model, fitted, {"job": job.to_dict()})
    assert exported.config["model"] == name
    assert exported.config["model_config"] == job.model.to_dict()
    reloaded = load_model_dir(save_model_dir(tmp_path / "m", exported))
    assert set(reloaded.tensors) == set(exported.tensors)
    for key, tensor in exported.tensors.items():
        assert torch.equal(reloaded.tensors[key], tensor.detach().cpu()), key
    assert reloaded.vocab == exported.vocab
    split = context.get("split") if spec.trained else None
    first = _predictions(spec, spec.load(exported), simulated, split)
    again = _predictions(spec, spec.load(reloaded), simulated, split)
    assert np.isfinite(first).all() and first.ndim == 2
    np.testing.assert_array_equal(first, again)


def test_spec_table_is_consistent():
    for name, spec in MODELS.items():
        assert spec.name == name
        assert get_spec(name) is spec
        assert (REPO / spec.debug_config).is_file(), spec.debug_config
        with open(REPO / spec.debug_config, "rb") as f:
            assert tomllib.load(f)["model"]["name"] == name
    with pytest.raises(ValueError, match="genepert.*scgpt"):
        get_spec("gpt2")


_FORBIDDEN_MODULES = {"ray", "deepspeed", "mlflow", "zarr", "tensorstore", "os", "pathlib",
                      "shutil", "h5py", "anndata", "safetensors", "pickle"}
_FORBIDDEN_CALLS = {"open", "environ", "getenv", "save", "load", "read_csv", "to_csv"}


@pytest.mark.parametrize("path", sorted(MODELS_DIR.rglob("*.py")), ids=lambda p: p.name)
def test_models_are_architecture_only(path):
    """No distributed/tracking/storage imports, environment variables or file I/O in models/."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            names = []
        for name in names:
            assert name.split(".")[0] not in _FORBIDDEN_MODULES, f"{path.name} imports {name}"
            assert not name.startswith(("pertscale.store", "pertscale.tracking",
                                        "pertscale.training")), f"{path.name} imports {name}"
        if isinstance(node, ast.Call):
            fn = node.func
            called = fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", "")
            assert called not in _FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {called}"
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("environ", "getenv"), f"{path.name}:{node.lineno} env access"


def test_model_section_is_chosen_by_name():
    from pertscale.eval.config import FitJobConfig
    from pertscale.models.genepert import GenePertConfig
    from pertscale.training.config import PretrainJobConfig

    job = FitJobConfig.from_dict({"model": {"name": "genepert", "alphas": [2.0]}})
    assert isinstance(job.model, GenePertConfig) and job.model.alphas == [2.0]
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['flavor'\] in section \[model\]"):
        FitJobConfig.from_dict({"model": {"name": "genepert", "flavor": "debug"}})
    with pytest.raises(ConfigError, match="is fitted in closed form.*pertscale fit genepert"):
        PretrainJobConfig.from_dict({"model": {"name": "genepert"}})
    with pytest.raises(ConfigError, match="trained on the engine.*pertscale pretrain"):
        FitJobConfig.from_dict({"model": {"name": "scgpt"}})
    with pytest.raises(ConfigError, match="model.name='gpt2' is not one of"):
        PretrainJobConfig.from_dict({"model": {"name": "gpt2"}})


def test_unknown_flavor_and_bad_sizes_list_options():
    with pytest.raises(ConfigError, match="debug.*small"):
        ScGPTConfig(flavor="huge")
    with pytest.raises(ConfigError, match="n_heads"):
        ScGPTConfig(d_model=100, n_heads=3)
