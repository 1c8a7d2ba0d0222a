"""The DataFrame interface of registered models (MLflow pyfunc `predict`) and its signature.

    predicts "delta"      input:  column `perturbation` (labels as in the data: "A", "A+B",
                                  "-A" for an inhibited gene), optional column `covariate`
                          output: one float column per readout gene, the predicted change of
                                  its mean (log1p-normalised expression) against control
    predicts "embedding"  input:  one column per gene id of the model's vocabulary (the
                                  signature's columns; absent genes are unexpressed), one row
                                  per cell, values = expression
                          output: columns emb_0 .. emb_{C-1}, the cell embedding
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pertscale.models.spec import ModelSpec

__all__ = ["predict_frame", "signature_for"]


def _perturbations(frame: pd.DataFrame) -> tuple[list[Any], list[str] | None]:
    from pertscale.data.perturbation import parse_perturbation

    if "perturbation" not in frame.columns:
        raise ValueError(f"input has no 'perturbation' column; columns: {list(frame.columns)}")
    perts = [parse_perturbation(str(label), control_labels=("ctrl", "control"))
             for label in frame["perturbation"]]
    covs = frame["covariate"].astype(str).tolist() if "covariate" in frame.columns else None
    return perts, covs


def predict_frame(spec: ModelSpec, predictor: Any, frame: pd.DataFrame) -> pd.DataFrame:
    """`predictor` (from `spec.load`) applied to a DataFrame, as described in the module doc."""
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if spec.predicts == "delta":
        perts, covs = _perturbations(frame)
        missing = predictor.missing_genes(perts)
        if missing:
            raise ValueError(f"{spec.name} cannot represent perturbed gene(s) {missing}")
        delta_PG = predictor.predict_delta(perts, covs)
        return pd.DataFrame(np.asarray(delta_PG, dtype=np.float64), columns=predictor.genes,
                            index=frame.index)
    emb_CD = predictor.embed(frame.to_numpy(dtype=np.float32), [str(c) for c in frame.columns])
    return pd.DataFrame(emb_CD, columns=[f"emb_{i}" for i in range(emb_CD.shape[1])],
                        index=frame.index)


def signature_for(spec: ModelSpec, predictor: Any):
    """The MLflow ModelSignature of a model version (`predictor` from `spec.load`)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    if spec.predicts == "delta":
        inputs = Schema([ColSpec("string", "perturbation"),
                         ColSpec("string", "covariate", required=False)])
        outputs = Schema([ColSpec("double", g) for g in predictor.genes])
    else:
        inputs = Schema([ColSpec("double", g, required=False) for g in predictor.genes])
        outputs = Schema([ColSpec("double", f"emb_{i}") for i in range(predictor.dim)])
    return ModelSignature(inputs=inputs, outputs=outputs)
