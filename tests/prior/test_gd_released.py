"""The release's GD step (``prior.gd.form="released"``, method notes section 10): checked against
a sample-by-sample transcription of its ``my_grad_utils.py`` formulas in float64."""

import pytest
import torch

from nfpi.errors import ConfigError
from nfpi.prior import ClassStatistics, GaussianPrior, GDConfig, GDSolver, LRPolicy, Objective


def _release_direction(z, y, mu, v, nll_min, nll_max, lam):
    """The release's per-class gradients on the gathered latents, written out sample by sample
    (``mvn_grad_pytorch_formula``, ``get_kld_loss_and_grad_and_min_max``,
    ``norm_grad_max_min_loss``), with 20 % widening of each range end."""
    k, d = mu.shape
    g_nf_mu, g_nf_v = torch.zeros_like(mu), torch.zeros_like(v)
    for c in range(k):
        zc = z[y == c]
        gm = (zc - mu[c]) / v[c]
        g_nf_mu[c] = -gm.sum(0)
        g_nf_v[c] = -(0.5 * (gm * gm - 1 / v[c])).sum(0)
    std = v.sqrt().clone().requires_grad_(True)
    m = mu.clone().requires_grad_(True)
    kl = torch.zeros(k, k, dtype=torch.float64)
    for a in range(k):
        for b in range(k):
            kl[a, b] = 0.5 * (
                (std[a] ** 2 / std[b] ** 2).sum()
                + ((m[b] - m[a]) ** 2 / std[b] ** 2).sum()
                - d
                + (2 * std[b].log()).sum()
                - (2 * std[a].log()).sum()
            )
    (-kl).sum().backward()
    g_kl_mu, g_kl_v = m.grad, std.grad / (2 * std.detach())
    neg = -kl.detach()
    per_class = (neg + neg.t()).sum(1) / (k - 1)
    lo, hi = per_class.min(), per_class.max()
    r_kl = ((hi + 0.2 * hi.abs()) - (lo - 0.2 * lo.abs())) * k * d
    r_nf = ((nll_max + 0.2 * abs(nll_max)) - (nll_min - 0.2 * abs(nll_min))) * len(z)
    return g_nf_mu / r_nf + lam * g_kl_mu / r_kl, g_nf_v / r_nf + lam * g_kl_v / r_kl


def _data(k=4, d=3, n=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    z = torch.randn(n, d, generator=gen, dtype=torch.float64) + y[:, None].double()
    stats = ClassStatistics.from_batch(z, y, k)
    stats.nll_range = torch.tensor([-3.5, 12.0], dtype=torch.float64)
    return z, y, stats


def test_released_direction_matches_the_release_formulas():
    z, y, stats = _data()
    init = GaussianPrior.from_statistics(stats)
    init = GaussianPrior(init.means + 0.1, var=init.var.clamp(0.3, 1.2))
    solver = GDSolver(init, Objective(lam=50.0), GDConfig(form="released"))
    g_mu, g_v = solver._released_grads(stats, 50.0)
    want_mu, want_v = _release_direction(z, y, solver.mu.detach(), solver.variances().detach(),
                                         -3.5, 12.0, 50.0)  # fmt: skip
    torch.testing.assert_close(g_mu, want_mu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_v, want_v, rtol=1e-10, atol=1e-12)


def test_released_steps_separate_the_classes_and_stay_finite():
    _, _, stats = _data(seed=1)
    init = GaussianPrior.from_statistics(stats)
    config = GDConfig(form="released", policy=LRPolicy(name="geometric_knots"), lam_end=25.0)
    solver = GDSolver(init, Objective(lam=50.0), config)
    before = solver.prior()
    prior, report = solver.run(stats, steps=30)
    assert report.steps == 30 and report.lams[0] == 50.0 and report.lams[-1] < 50.0
    assert torch.isfinite(prior.means).all() and torch.isfinite(prior.var).all()
    from nfpi.prior import pairwise_kl

    off = ~torch.eye(4, dtype=torch.bool)
    assert (
        pairwise_kl(prior.means, prior.var)[off].min()
        > pairwise_kl(before.means, before.var)[off].min()
    )


def test_released_form_without_the_nll_range_names_what_is_missing():
    _, _, stats = _data()
    stats.nll_range = None
    solver = GDSolver(GaussianPrior.from_statistics(stats), Objective(lam=50.0),
                      GDConfig(form="released"))  # fmt: skip
    with pytest.raises(ConfigError, match="nll_range"):
        solver.run(stats, steps=1)


def test_statistics_merge_keeps_the_widest_nll_range():
    _, _, a = _data(seed=2)
    _, _, b = _data(seed=3)
    b.nll_range = torch.tensor([-7.0, 4.0], dtype=torch.float64)
    assert (a + b).nll_range.tolist() == [-7.0, 12.0]


@pytest.mark.slow
def test_gd_as_released_trains_and_its_statistics_carry_the_nll_range(tmp_path):
    from nfpi.presets import experiment_config, gd_overrides
    from nfpi.training import Trainer

    config = experiment_config(
        "smoke",
        {"prior.method": "gd", **gd_overrides("as_released"), "eval.plots": False,
         "prior.gd.steps_per_solve": 3},
    )  # fmt: skip
    trainer = Trainer(config, tmp_path / "run")
    stats = trainer._statistics(trainer.flow, 0)
    lo, hi = stats.nll_range.tolist()
    assert lo <= hi
    history = trainer.fit()
    assert [h["gd_steps"] for h in history] == [3.0, 3.0]
