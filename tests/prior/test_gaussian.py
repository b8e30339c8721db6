"""GaussianPrior densities, sampling, round trips; pairwise KL in GEMM form."""

import io

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from nfpi.errors import LabelRangeError, NonFiniteError, ShapeError
from nfpi.prior import ClassStatistics, GaussianPrior, pairwise_kl_diag, pairwise_kl_full
from nfpi.prior.naive import pairwise_kl_broadcast


def _random_prior(k, d, full=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g, dtype=torch.float64) * 2
    if not full:
        return GaussianPrior(means, var=torch.rand(k, d, generator=g, dtype=torch.float64) + 0.3)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    return GaussianPrior(means, cov=a @ a.mT / d + 0.5 * torch.eye(d, dtype=torch.float64))


def _reference_dists(prior):
    if prior.covariance == "diag":
        return [
            Independent(Normal(prior.means[k], prior.var[k].sqrt()), 1)
            for k in range(prior.num_classes)
        ]
    return [MultivariateNormal(prior.means[k], prior.cov[k]) for k in range(prior.num_classes)]


@pytest.mark.parametrize("full", [False, True])
def test_log_prob_matrix_matches_torch_distributions(full):
    prior = _random_prior(7, 5, full)
    z = torch.randn(11, 5, dtype=torch.float64) * 2
    ref = torch.stack([dist.log_prob(z) for dist in _reference_dists(prior)], dim=1)
    torch.testing.assert_close(prior.log_prob_matrix(z), ref)
    y = torch.randint(0, 7, (11,))
    torch.testing.assert_close(prior.log_prob(z, y), ref[torch.arange(11), y])
    assert torch.equal(prior.classify(z), ref.argmax(1))


def test_log_prob_in_float32_follows_input_dtype():
    prior = _random_prior(3, 4)
    z = torch.randn(6, 4)
    assert prior.log_prob_matrix(z).dtype == torch.float32
    torch.testing.assert_close(prior.log_prob_matrix(z), prior.log_prob_matrix(z.double()).float())


@pytest.mark.parametrize("full", [False, True])
def test_sample_moments_and_temperature(full):
    prior = _random_prior(2, 3, full)
    y = torch.ones(40000, dtype=torch.long)
    gen = torch.Generator().manual_seed(1)
    z = prior.sample(y, temperature=0.5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(z.mean(0), prior.means[1], atol=0.03, rtol=0)
    cov = prior.cov[1] if full else torch.diag(prior.var[1])
    torch.testing.assert_close(torch.cov(z.T), 0.25 * cov, atol=0.02, rtol=0)
    assert torch.equal(
        prior.sample(y[:3], temperature=0.0, dtype=torch.float64), prior.means[[1, 1, 1]]
    )


@pytest.mark.parametrize("full", [False, True])
def test_save_load_round_trip(full):
    prior = _random_prior(4, 3, full)
    buffer = io.BytesIO()
    torch.save(prior.state_dict(), buffer)
    buffer.seek(0)
    loaded = GaussianPrior.from_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.covariance == prior.covariance
    z = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(loaded.log_prob_matrix(z), prior.log_prob_matrix(z))


def test_data_init_constructor_is_class_moments():
    z = torch.randn(300, 4, dtype=torch.float64)
    y = torch.arange(300) % 3
    stats = ClassStatistics.from_batch(z, y, 3)
    prior = GaussianPrior.from_statistics(stats)
    torch.testing.assert_close(prior.means[2], z[y == 2].mean(0))
    torch.testing.assert_close(prior.var[2], z[y == 2].var(0))
    ident = GaussianPrior.from_statistics(stats, variance_init="identity")
    assert torch.equal(ident.var, torch.ones(3, 4, dtype=torch.float64))


def test_prior_errors():
    prior = _random_prior(3, 2)
    with pytest.raises(ShapeError, match=r"\[B, 2\]"):
        prior.log_prob_matrix(torch.zeros(4, 3))
    with pytest.raises(LabelRangeError):
        prior.log_prob(torch.zeros(2, 2), torch.tensor([0, 3]))
    with pytest.raises(NonFiniteError, match="> 0"):
        GaussianPrior(torch.zeros(2, 2), var=torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    with pytest.raises(NonFiniteError):
        GaussianPrior(torch.tensor([[0.0, float("nan")]]), var=torch.ones(1, 2))
    with pytest.raises(NonFiniteError, match="positive definite"):
        GaussianPrior(torch.zeros(1, 2), cov=torch.tensor([[[1.0, 2.0], [2.0, 1.0]]]))
    with pytest.raises(ShapeError):
        GaussianPrior(torch.zeros(2, 2), var=torch.ones(2, 3))


@pytest.mark.parametrize("k", [2, 7, 101])
def test_pairwise_kl_gemm_equals_torch_and_broadcast(k):
    prior = _random_prior(k, 6, seed=k)
    kl = pairwise_kl_diag(prior.means, prior.var)
    assert torch.equal(kl.diagonal(), torch.zeros(k, dtype=torch.float64))
    torch.testing.assert_close(
        kl, pairwise_kl_broadcast(prior.means, prior.var), rtol=1e-10, atol=1e-10
    )
    dists = _reference_dists(prior)
    for a, b in [(0, 1), (1, 0), (k - 1, 0)]:
        torch.testing.assert_close(kl[a, b], kl_divergence(dists[a], dists[b]))


def test_pairwise_kl_full_equals_torch():
    prior = _random_prior(5, 4, full=True)
    kl = pairwise_kl_full(prior.means, prior.cov)
    assert torch.equal(kl.diagonal(), torch.zeros(5, dtype=torch.float64))
    dists = _reference_dists(prior)
    ref = torch.stack([torch.stack([kl_divergence(a, b) for b in dists]) for a in dists])
    torch.testing.assert_close(kl, ref.fill_diagonal_(0.0))
