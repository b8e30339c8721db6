"""The logged model's sampling requests are checked and drawn in chunks (issue 22): a NaN
temperature, n < 0 and a huge n are one-line errors naming the key, not zeros, a raw error or
a 51 GB allocation."""

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from nfpi.checkpoint import load_trained
from ray_jobs import pyfunc_flow


@pytest.fixture(scope="module")
def model(checkpoint):
    m = pyfunc_flow.NfpiFlowModel()
    m.model = load_trained(checkpoint)
    return m


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"class": 1, "n": 2, "temperature": float("nan")}, "temperature must be a finite"),
        ({"class": 1, "n": 2, "temperature": -1}, "temperature must be a finite"),
        ({"class": 1, "n": -3}, "n must be >= 0"),
        ({"class": 1, "n": 2.5}, "n must be a whole number"),
        ({"class": 1, "n": 10**8}, "more than 100000 per call"),
        ({"class": 10, "n": 1}, "class 10 is out of range: classes are 0..9"),
        ({"class": [1], "count": 2}, "unknown keys"),
        ({"n": 2}, "needs 'class'"),
    ],
)
def test_bad_sampling_requests_are_named(model, request_, message):
    """Before: NaN gave all-zero images, n < 0 a raw torch error, n = 1e8 tried to allocate
    51 GB, class 10 of 10 an index error deep in the prior."""
    with pytest.raises(MlflowException, match=message) as err:
        model.predict(None, request_)
    assert "\n" not in err.value.message


def test_samples_are_drawn_in_chunks_the_same_as_at_once(model, monkeypatch):
    request_ = {"class": [3, 4], "n": 5, "temperature": 0.7, "seed": 2}
    whole = model.predict(None, request_)
    assert whole.shape == (10, 1, 8, 8) and whole.dtype == np.uint8
    monkeypatch.setattr(pyfunc_flow, "CHUNK", 3)
    chunked = model.predict(None, request_)
    assert chunked.shape == whole.shape
    np.testing.assert_array_equal(chunked, model.predict(None, request_))  # seeded
    assert model.predict(None, {"class": 1, "n": 0}).shape == (0, 1, 8, 8)
