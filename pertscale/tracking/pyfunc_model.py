"""The MLflow models-from-code entry point of every registered pertscale model.

MLflow copies this file into each logged model and executes it on `mlflow.pyfunc.load_model`
(no pickle, no cloudpickle of Python objects). `load_context` verifies every file of the model's
`pertscale` artifact folder against its manifest before anything is loaded, then asks the
model's spec for its predictor; `predict` takes a DataFrame (see `pertscale.tracking.pyfunc`).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class PertscaleModel(PythonModel):
    """A pertscale model behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        from pertscale.models import get_spec
        from pertscale.tracking.registry import load_model_dir

        self.exported = load_model_dir(Path(context.artifacts["pertscale"]))
        self.spec = get_spec(self.exported.config["model"])
        self.predictor = self.spec.load(self.exported)

    def predict(self, context, model_input, params=None):
        from pertscale.tracking.pyfunc import predict_frame

        return predict_frame(self.spec, self.predictor, model_input)


mlflow.models.set_model(PertscaleModel())
