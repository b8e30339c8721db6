"""The Anderson mixer of the FPI solver, as a unit: exactness on linear maps, history, reset."""

import pytest
import torch

from nfpi.errors import ConfigError
from nfpi.prior import AndersonMixer


def _affine(n, seed=0, rho=0.9):
    """u -> A u + b with spectral radius rho (a contraction with a known fixed point)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(-rho, rho, n, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    fixed = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - a, b)
    return (lambda u: a @ u + b - u), fixed


def test_first_step_is_the_plain_step():
    residual, _ = _affine(4)
    mixer = AndersonMixer(3, torch.ones(4, dtype=torch.float64))
    u = torch.zeros(4, dtype=torch.float64)
    assert torch.equal(mixer.step(u, residual(u)), u + residual(u))
    assert mixer.history == 0


@pytest.mark.parametrize("n", [2, 5])
def test_exact_on_a_linear_map_after_n_plus_one_steps(n):
    # With memory >= n, Anderson mixing on an affine map is GMRES: exact after n + 1 steps.
    residual, fixed = _affine(n)
    mixer = AndersonMixer(n, torch.ones(n, dtype=torch.float64))
    u = torch.zeros(n, dtype=torch.float64)
    for _ in range(n + 1):
        u = mixer.step(u, residual(u))
    torch.testing.assert_close(u, fixed, rtol=1e-7, atol=0)  # exact up to the 1e-10 ridge


def test_extrapolates_through_a_period_two_oscillation():
    # u -> -0.999 u + 1: the plain iteration oscillates and needs ~10^4 steps to reach 1e-6.
    residual = lambda u: -0.999 * u + 1.0 - u
    mixer = AndersonMixer(2, torch.ones(1, dtype=torch.float64))
    u = torch.zeros(1, dtype=torch.float64)
    for _ in range(3):
        u = mixer.step(u, residual(u))
    assert abs(float(u) - 1.0 / 1.999) < 1e-12


def test_history_is_capped_and_reset_forgets_it():
    residual, _ = _affine(6, rho=0.5)
    mixer = AndersonMixer(2, torch.ones(6, dtype=torch.float64))
    u = torch.zeros(6, dtype=torch.float64)
    for _ in range(5):
        u = mixer.step(u, residual(u))
    assert mixer.history == 2
    mixer.reset()
    assert mixer.history == 0
    assert torch.equal(mixer.step(u, residual(u)), u + residual(u))


def test_weights_change_the_least_squares_fit_not_the_fixed_point():
    residual, fixed = _affine(3)
    weight = torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)
    mixer = AndersonMixer(3, weight)
    u = torch.zeros(3, dtype=torch.float64)
    for _ in range(6):
        u = mixer.step(u, residual(u))
    torch.testing.assert_close(u, fixed, rtol=0, atol=1e-12)


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="anderson_memory"):
        AndersonMixer(0, torch.ones(3))
    with pytest.raises(ConfigError, match="weight"):
        AndersonMixer(2, torch.tensor([1.0, 0.0]))
