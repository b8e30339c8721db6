"""A trained flow and its class prior as an MLflow ``pyfunc`` model (MLflow "model from code":
:func:`ray_jobs.mlflow_logging.log_flow_model` copies this file into the logged model, with the
``nfpi`` package, and MLflow runs it when the model is loaded; it is not imported otherwise).

    model = mlflow.pyfunc.load_model("models:/nfpi-digits@fpi")  # or runs:/<run id>/model
    model.predict(images)                        # uint8 [N, C, H, W] -> class index per image
    model.predict(images, params={"seed": 1})    # another dequantisation noise
    flow = model.unwrap_python_model()
    flow.sample(3, n=8)                          # -> 8 samples of class 3, uint8 [8, C, H, W]
    flow.sample([0, 1], n=4, temperature=0.7, seed=1)

The model's signature (inferred from its input example, a few images shaped like the training
data) describes classification, which ``predict`` checks its input against; sampling is the
unwrapped model's ``sample`` (a signature describes one input type; ``predict`` of the unwrapped
model still takes the sampling request ``{"class": 3, "n": 8}`` too).

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
    def sample(self, classes, n=1, temperature=1.0, seed=0):
        """``n`` samples of each class in ``classes`` (an int or a list), uint8 [N, C, H, W]."""
        from nfpi.data import to_uint8

        classes = np.atleast_1d(np.asarray(classes, dtype=np.int64))
        gen = torch.Generator().manual_seed(int(seed))
        labels = torch.from_numpy(classes).repeat_interleave(int(n))
        z = self.model.prior.sample(labels, temperature=float(temperature), generator=gen)
        x, _ = self.model.flow.inverse(z)
        return to_uint8(x).numpy()

    @torch.no_grad()
    def predict(self, context, model_input, params=None):
        from nfpi.data import dequantize

        flow, prior = self.model.flow, self.model.prior
        if isinstance(model_input, dict):
            return self.sample(
                model_input["class"],
                n=model_input.get("n", 1),
                temperature=model_input.get("temperature", 1.0),
                seed=model_input.get("seed", 0),
            )
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
