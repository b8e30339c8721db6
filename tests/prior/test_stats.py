"""Class statistics: vectorised accumulation, merging, stability, named errors."""

import pytest
import torch

from nfpi.errors import InsufficientSamplesError, LabelRangeError, NonFiniteError, ShapeError
from nfpi.prior import ClassStatistics


def _data(n=500, k=4, d=3, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) + offset + y[:, None].double()
    return z, y


def test_moments_match_per_class_reference():
    z, y = _data()
    stats = ClassStatistics.from_batch(z, y, 4)
    for c in range(4):
        zc = z[y == c]
        assert stats.count[c] == len(zc)
        torch.testing.assert_close(stats.mean()[c], zc.mean(0))
        torch.testing.assert_close(stats.var()[c], zc.var(0, unbiased=True))


def test_full_covariance_matches_torch_cov():
    z, y = _data(d=5)
    stats = ClassStatistics.from_batch(z, y, 4, full=True)
    for c in range(4):
        torch.testing.assert_close(stats.cov()[c], torch.cov(z[y == c].T))
    torch.testing.assert_close(torch.diagonal(stats.cov(), dim1=1, dim2=2), stats.var())


@pytest.mark.parametrize("full", [False, True])
def test_merged_equals_concatenated(full):
    z, y = _data(n=900)
    whole = ClassStatistics.from_batch(z, y, 4, full=full)
    # Different shifts on each part: merging re-expresses the right operand exactly.
    parts = [
        ClassStatistics.from_batch(z[i : i + 300], y[i : i + 300], 4, full=full)
        for i in (0, 300, 600)
    ]
    merged = parts[0] + parts[1] + parts[2]
    torch.testing.assert_close(merged.count, whole.count)
    torch.testing.assert_close(merged.mean(), whole.mean())
    torch.testing.assert_close(merged.var(), whole.var())
    if full:
        torch.testing.assert_close(merged.cov(), whole.cov())


def test_streaming_on_common_shift_is_all_reducible():
    z, y = _data(n=600)
    shift = torch.randn(4, 3, dtype=torch.float64)
    a = ClassStatistics.empty(4, 3, shift=shift).update_(z[:250], y[:250])
    b = ClassStatistics.empty(4, 3, shift=shift).update_(z[250:], y[250:])
    reduced = a.with_flat(a.flat() + b.flat())  # what all_reduce(SUM) does to the flat buffers
    whole = ClassStatistics.from_batch(z, y, 4)
    torch.testing.assert_close(reduced.mean(), whole.mean())
    torch.testing.assert_close(reduced.var(), whole.var())


def test_stable_for_large_means():
    # Latent means of 1e8 with unit spread: naive float64 sums of squares lose every digit.
    z, y = _data(n=2000, offset=1e8)
    exact = torch.stack([(z[y == c] - 1e8).var(0) for c in range(4)])
    stats = ClassStatistics.from_batch(z, y, 4)  # shifted by the batch's class means
    torch.testing.assert_close(stats.var(), exact, rtol=1e-9, atol=1e-9)
    streamed = ClassStatistics.empty(4, 3, shift=stats.mean()).update_(z[:1000], y[:1000])
    streamed.update_(z[1000:], y[1000:])
    torch.testing.assert_close(streamed.var(), exact, rtol=1e-9, atol=1e-9)
    naive = (z**2).sum(0) - z.sum(0) ** 2 / len(z)  # demonstrates the cancellation the shift avoids
    assert not torch.allclose(naive / (len(z) - 1), (z - 1e8).var(0), rtol=1e-3)


def test_float32_latents_accumulate_in_float64():
    z, y = _data()
    stats = ClassStatistics.from_batch(z.float(), y, 4)
    assert stats.sum.dtype == torch.float64 and stats.mean().dtype == torch.float64


def test_no_python_loop_over_classes_for_many_classes():
    z = torch.randn(5000, 8, dtype=torch.float64)
    y = torch.arange(5000) % 1000
    stats = ClassStatistics.from_batch(z, y, 1000)
    torch.testing.assert_close(stats.mean()[7], z[y == 7].mean(0))


def test_errors_are_named():
    z, y = _data()
    with pytest.raises(LabelRangeError, match=r"\[0, 3\)"):
        ClassStatistics.from_batch(z, y, 3)
    with pytest.raises(LabelRangeError):
        ClassStatistics.from_batch(z, y - 1, 4)
    bad = z.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(NonFiniteError):
        ClassStatistics.from_batch(bad, y, 4)
    with pytest.raises(ShapeError, match=r"\[B, d\]"):
        ClassStatistics.from_batch(z[:, :, None], y, 4)
    with pytest.raises(ShapeError):
        ClassStatistics.from_batch(z, y[:-1], 4)
    with pytest.raises(ShapeError, match="integer"):
        ClassStatistics.from_batch(z, y.double(), 4)
    with pytest.raises(ShapeError, match="d=2"):
        ClassStatistics.empty(4, 3).update_(z[:, :2], y)
    one = ClassStatistics.from_batch(z[:5], torch.tensor([0, 0, 1, 1, 2]), 4)
    with pytest.raises(InsufficientSamplesError, match="3 \\(n=0\\)"):
        one.mean()
    with pytest.raises(InsufficientSamplesError, match="2 \\(n=1\\)"):
        ClassStatistics.from_batch(z[:5], torch.tensor([0, 0, 1, 1, 2]), 3).var()
    with pytest.raises(ShapeError):
        ClassStatistics.from_batch(z, y, 4) + ClassStatistics.from_batch(z, y, 4, full=True)
