"""Every registered model: debug flavor trains a step on CPU; models/ stays architecture-only."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import pertscale.models
from pertscale.config import ConfigError
from pertscale.constants import INDICES, INDPTR, OBS, VALUES
from pertscale.data.tokenizer import Tokenizer, TokenizerConfig
from pertscale.models import MODELS, LossOutput, ModelConfig, build_model

torch.set_num_threads(2)
MODELS_DIR = Path(pertscale.models.__file__).parent
N_GENES = 200


def _scgpt_batch(layout: str):
    rng = np.random.default_rng(0)
    m = sp.random(6, N_GENES, density=0.15, random_state=rng, format="csr",
                  data_rvs=lambda n: rng.poisson(3, n) + 1).astype(np.float32)
    csr = {INDPTR: m.indptr.astype(np.int64), INDICES: m.indices.astype(np.int32),
           VALUES: m.data, OBS: {}}
    return Tokenizer(TokenizerConfig(max_seq_len=64), range(N_GENES + 3))(
        csr, layout=layout, generator=torch.Generator().manual_seed(0))


# model name -> debug batch for a layout. A model added to MODELS needs an entry here.
DEBUG_BATCHES = {"scgpt": _scgpt_batch}


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_debug_flavor_forward_backward(name, layout):
    if name not in DEBUG_BATCHES:
        pytest.fail(f"model {name!r} is in MODELS but has no debug batch in DEBUG_BATCHES")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, flavor="debug"), N_GENES + 3)
    out = model(DEBUG_BATCHES[name](layout))
    assert isinstance(out, LossOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"parameters outside the loss: {unused}"
    for value in out.metrics.values():
        assert not value.requires_grad


_FORBIDDEN_MODULES = {"ray", "deepspeed", "mlflow", "zarr", "tensorstore", "os", "pathlib",
                      "shutil", "h5py", "anndata", "safetensors"}
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
        if isinstance(node, ast.Call):
            fn = node.func
            called = fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", "")
            assert called not in _FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {called}"
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("environ", "getenv"), f"{path.name}:{node.lineno} env access"


def test_unknown_model_and_flavor_list_options():
    with pytest.raises(ConfigError, match="scgpt"):
        ModelConfig(name="gpt2")
    with pytest.raises(ConfigError, match="debug.*small"):
        ModelConfig(flavor="huge")
    with pytest.raises(ConfigError, match="n_heads"):
        ModelConfig(d_model=100, n_heads=3)
