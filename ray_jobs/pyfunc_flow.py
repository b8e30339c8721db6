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

Inputs are checked: class indices in ``[0, K)``, ``n`` a whole number >= 0, ``temperature``
finite and >= 0, at most :data:`MAX_SAMPLES` samples per call (each error one line naming the
key); samples are drawn and decoded :data:`CHUNK` at a time, so memory stays bounded by the
output.

Classification is the paper's NF-Acc rule: the EMA flow's latent of each (dequantised) image,
``argmax_y log N(z; mu_y, Sigma_y)``. Sampling draws ``z ~ N(mu_y, T^2 Sigma_y)`` and inverts the
flow. The dequantisation noise and the samples are seeded (``seed``, default 0).
"""

from __future__ import annotations

import math

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

#: The most samples one ``predict`` call returns (n x number of classes); ask several times
#: with other seeds for more.
MAX_SAMPLES = 100_000
#: Samples drawn and decoded at a time.
CHUNK = 1024


def _invalid(message):
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _whole(value, key):
    """``value`` as an int if it is a whole number (3, 3.0, "3"), else an error naming ``key``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _invalid(f"{key} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise _invalid(f"{key} must be a whole number, got {value!r}")
    return int(number)


def sampling_request(model_input, num_classes):
    """The checked ``(classes, n, temperature, seed)`` of a sampling request (see the module)."""
    unknown = sorted(set(model_input) - {"class", "n", "temperature", "seed"})
    if unknown:
        raise _invalid(
            f"unknown keys {unknown}: a sampling request takes class, n, temperature, seed"
        )
    if "class" not in model_input:
        raise _invalid("a sampling request needs 'class': a class index or a list of them")
    classes = [
        _whole(c, "class") for c in np.atleast_1d(np.asarray(model_input["class"], dtype=object))
    ]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise _invalid(f"class {bad[0]} is out of range: classes are 0..{num_classes - 1}")
    n = _whole(model_input.get("n", 1), "n")
    if n < 0:
        raise _invalid(f"n must be >= 0 (samples per class), got {n}")
    try:
        temperature = float(model_input.get("temperature", 1.0))
    except (TypeError, ValueError):
        temperature = float("nan")
    if not math.isfinite(temperature) or temperature < 0:
        raise _invalid(
            f"temperature must be a finite number >= 0, got {model_input.get('temperature')!r}"
        )
    if len(classes) * n > MAX_SAMPLES:
        raise _invalid(
            f"{len(classes)} classes x n={n} = {len(classes) * n} samples is more than "
            f"{MAX_SAMPLES} per call: ask several times with other seeds"
        )
    return classes, n, temperature, _whole(model_input.get("seed", 0), "seed")


class NfpiFlowModel(mlflow.pyfunc.PythonModel):
    """``load_context`` reads the checkpoint artifact with :func:`nfpi.checkpoint.load_trained`;
    ``predict`` classifies images or samples classes (see the module)."""

    def load_context(self, context):  # no annotations: MLflow reads them as a schema
        from nfpi.checkpoint import load_trained

        self.model = load_trained(context.artifacts["checkpoint"])

    @torch.no_grad()
    def sample(self, classes, n=1, temperature=1.0, seed=0):
        """``n`` samples of each class in ``classes`` (an int or a list), uint8 [N, C, H, W]."""
        request = {"class": classes, "n": n, "temperature": temperature, "seed": seed}
        return self._generate(*sampling_request(request, self.model.info.num_classes))

    def _generate(self, classes, n, temperature, seed):
        """Checked requests only; drawn and decoded :data:`CHUNK` samples at a time."""
        from nfpi.data import to_uint8

        info = self.model.info
        gen = torch.Generator().manual_seed(seed)
        labels = torch.tensor(classes, dtype=torch.int64).repeat_interleave(n)
        out = np.empty((len(labels), *info.shape), dtype=np.uint8)
        for start in range(0, len(labels), CHUNK):
            part = labels[start : start + CHUNK]
            x, _ = self.model.flow.inverse(
                self.model.prior.sample(part, temperature=temperature, generator=gen)
            )
            out[start : start + len(part)] = to_uint8(x).numpy()
        return out

    @torch.no_grad()
    def predict(self, context, model_input, params=None):
        from nfpi.data import dequantize

        flow, prior = self.model.flow, self.model.prior
        if isinstance(model_input, dict):
            return self._generate(*sampling_request(model_input, self.model.info.num_classes))
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
