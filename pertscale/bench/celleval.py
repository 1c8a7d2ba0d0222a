"""Our evaluation beside cell-eval's own: the AnnData files cell-eval scores and the run of its
peer script (`celleval_peer.py`) in the venv that has cell-eval (`.venv-celleval`, made by
`make .venv-celleval/.installed`).

`write_celleval_inputs` writes what a user would hand cell-eval for a mean-change predictor:
- real.h5ad: the real cells of the evaluated conditions and their controls (log1p values, as
  pertscale scores them), obs `target_gene` = the perturbed genes joined by "+" (no sign),
  controls "non-targeting", var names = gene symbols (cell-eval leaves a target gene out of the
  discrimination score by matching its label to a var name);
- <model>.h5ad: the same control cells, and for every condition its control cells shifted by
  the predicted change and clipped at zero (`pertscale.eval.de.shifted_cells`).
cell-eval scores one set of perturbations against its controls, so the conditions must share
one covariate value.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from pertscale.data.perturbation import PerturbationData
from pertscale.eval.de import shifted_cells
from pertscale.eval.scoring import EvalCells

__all__ = ["CONTROL", "PEER", "PERT_COL", "run_celleval_peer", "write_celleval_inputs"]

PEER = Path(__file__).with_name("celleval_peer.py")
CONTROL = "non-targeting"
PERT_COL = "target_gene"


def _adata(blocks: list[np.ndarray], labels: list[str], symbols: list[str]):
    import anndata as ad
    import pandas as pd

    x = np.concatenate(blocks).astype(np.float32)
    obs = pd.DataFrame({PERT_COL: pd.Categorical(labels)},
                       index=[f"cell{i}" for i in range(x.shape[0])])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=symbols))


def write_celleval_inputs(data: PerturbationData, cells: EvalCells, conditions: list[str],
                          predictions: dict[str, np.ndarray], out_dir: str | Path
                          ) -> tuple[Path, dict[str, Path], list[str]]:
    """real.h5ad and one <name>.h5ad per prediction (`predictions[name]` = delta [C, G] for
    `conditions`); returns their paths and each condition's label there."""
    covariates = {str(data.conditions.at[c, "covariate"]) for c in conditions}
    if len(covariates) != 1:
        raise ValueError(f"cell-eval scores one control group; conditions span covariate "
                         f"values {sorted(covariates)}")
    if len(set(data.symbols)) != len(data.symbols):
        raise ValueError("gene symbols are not unique: cell-eval needs unique var names")
    ctrl = cells.controls[covariates.pop()]
    # NOTE: rows of column-sorted matrices are not the original cells, but every metric of the
    # vcc profile is computed gene by gene over a group's values (means, Mann-Whitney), so they
    # give the same scores as the cells themselves
    control = ctrl.sorted_NG
    # NOTE: labels without the inhibition sign: cell-eval finds a single's target gene by its
    # label, so a single is labelled by its gene symbol
    perts = [data.perturbation(c) for c in conditions]
    names = ["+".join([*p.genes, *p.treatments]) for p in perts]
    if len(set(names)) != len(names):
        raise ValueError("a gene is perturbed in both directions among the conditions; cell-eval "
                         "labels perturbations by gene name only")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    real = _adata([control, *(cells.conditions[c].sorted_NG for c in conditions)],
                  [CONTROL] * control.shape[0]
                  + [n for c, n in zip(conditions, names) for _ in range(cells.conditions[c].n)],
                  data.symbols)
    real_path = out / "real.h5ad"
    real.write_h5ad(real_path)
    paths = {}
    for model, delta_CG in predictions.items():
        blocks = [control] + [shifted_cells(control.copy(), d) for d in delta_CG]
        pred = _adata(blocks, [CONTROL] * control.shape[0]
                      + [n for n in names for _ in range(control.shape[0])], data.symbols)
        paths[model] = out / f"{model}.h5ad"
        pred.write_h5ad(paths[model])
    return real_path, paths, names


def run_celleval_peer(python: str | Path, real: Path, preds: dict[str, Path], baseline: str,
                      outdir: str | Path, timeout_s: float = 900) -> dict[str, Any]:
    """cell-eval's vcc results and baseline scores for every prediction (see the peer's
    docstring); a failure raises with the peer's stderr."""
    cmd = [str(python), str(PEER), "--real", str(real), "--baseline", baseline,
           "--control", CONTROL, "--pert-col", PERT_COL, "--outdir", str(outdir)]
    for name, path in preds.items():
        cmd += ["--pred", f"{name}={path}"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"cell-eval peer failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
