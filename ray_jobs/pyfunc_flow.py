"""A trained flow and its class prior as an MLflow ``pyfunc`` model (MLflow "model from code":
:func:`ray_jobs.mlflow_logging.log_flow_model` copies this file into the logged model, with the
``nfpi`` package, and MLflow runs it when the model is loaded; it is not imported otherwise).

    model = mlflow.pyfunc.load_model("models:/<name>/1")   # or runs:/<run id>/model
    model.predict(images)                        # uint8 [N, C, H, W] -> class index per image
    model.predict({"class": 3, "n": 8})          # -> 8 samples of class 3, uint8 [8, C, H, W]
    model.predict({"class": [0, 1], "n": 4, "temperature": 0.7, "seed": 1})

Classification is the paper's NF-Acc rule: the EMA flow's latent of each (dequantised) image,
``argmax_y log N(z; mu_y, Sigma_y)``. Sampling draws ``z ~ N(mu_y, T^2 Sigma_y)`` and inverts the
flow. The dequantisation noise and the samples are seeded (``seed``, default 0).
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch


class NfpiFlowModel(mlflow.pyfunc.PythonModel):
    """``load_context`` reads the checkpoint artifact with :func:`nfpi.checkpoint.load_trained`;
    ``predict`` classifies images or samples classes (see the module)."""

    def load_context(self, context):  # no annotations: MLflow reads them as a schema
        from nfpi.checkpoint import load_trained

        self.model = load_trained(context.artifacts["checkpoint"])

    @torch.no_grad()
    def predict(self, context, model_input, params=None):
        from nfpi.data import dequantize, to_uint8

        flow, prior = self.model.flow, self.model.prior
        if isinstance(model_input, dict):
            classes = np.atleast_1d(np.asarray(model_input["class"], dtype=np.int64))
            n = int(model_input.get("n", 1))
            temperature = float(model_input.get("temperature", 1.0))
            gen = torch.Generator().manual_seed(int(model_input.get("seed", 0)))
            labels = torch.from_numpy(classes).repeat_interleave(n)
            x, _ = flow.inverse(prior.sample(labels, temperature=temperature, generator=gen))
            return to_uint8(x).numpy()
        images = torch.as_tensor(np.asarray(model_input))
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W] like the training data "
                f"{tuple(self.model.info.shape)}; got {images.dtype} {tuple(images.shape)}"
            )
        seed = int((params or {}).get("seed", 0))
        z, _ = flow(dequantize(images, torch.Generator().manual_seed(seed)))
        return prior.classify(z).numpy()


mlflow.models.set_model(NfpiFlowModel())
