"""The gradient-descent baseline and its learning-rate policies; the PriorService."""

import itertools
import math

import pytest
import torch

from nfpi.errors import ConfigError, ShapeError
from nfpi.prior import (
    POLICY_POWERS,
    ClassStatistics,
    FPIConfig,
    GaussianPrior,
    GDConfig,
    GDSolver,
    LRPolicy,
    Objective,
    PriorService,
    report_kind,
    solve_fpi,
)


def _stats(k=4, d=3, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n * k) % k
    z = 0.3 * torch.randn(k, d, generator=g, dtype=torch.float64)[y]
    z = z + 0.7 * torch.randn(n * k, d, generator=g, dtype=torch.float64)
    return ClassStatistics.from_batch(z, y, k)


# --------------------------------------------------------------------------------- policies
@pytest.mark.parametrize("name", list(POLICY_POWERS))
def test_polynomial_policy_shapes(name):
    # 101 steps: step 0 at lr0, step 50 mid-way, step 100 (the last one taken) at lr_min.
    pol = LRPolicy(name=name, lr0=0.1, lr_min=0.001, total_steps=101)
    lrs = [pol.lr(t) for t in range(151)]
    assert (
        lrs[0] == pytest.approx(0.1) and lrs[100] == pytest.approx(0.001) and lrs[150] == lrs[100]
    )
    assert all(a >= b for a, b in itertools.pairwise(lrs))  # non-increasing
    p = POLICY_POWERS[name]
    assert pol.lr(50) == pytest.approx(0.001 + 0.099 * 0.5**p)
    linear_mid = 0.001 + 0.099 * 0.5
    # sublinear: above the linear decay mid-way (concave); superlinear: below it (convex)
    if name.startswith("sublinear"):
        assert pol.lr(50) > linear_mid
    elif name.startswith("superlinear"):
        assert pol.lr(50) < linear_mid
    else:
        assert pol.lr(50) == pytest.approx(linear_mid)


def test_v2_policies_are_more_extreme_than_v1():
    mk = lambda n: LRPolicy(name=n, total_steps=101).lr(50)
    assert mk("sublinear_v2") > mk("sublinear_v1") and mk("superlinear_v2") < mk("superlinear_v1")


@pytest.mark.parametrize("name", list(POLICY_POWERS))
@pytest.mark.parametrize("steps", [1, 2, 200, 50_000])
def test_decaying_policy_reaches_lr_min_at_the_last_step_taken(name, steps):
    pol = LRPolicy(name=name, lr0=0.1, lr_min=1e-3, total_steps=steps)
    assert pol.lr(steps - 1) == (1e-3 if steps > 1 else 0.1)
    assert pol.lr(0) == 0.1 or steps == 1


def test_decaying_policy_without_a_horizon_names_the_key():
    from nfpi.errors import ConfigError

    assert LRPolicy(name="geometric_knots").lr(5) > 0  # knots need no horizon
    with pytest.raises(ConfigError, match="total_steps"):
        LRPolicy(name="linear").lr(0)


def test_release_geometric_knots_and_constant():
    pol = LRPolicy(name="geometric_knots")
    assert [pol.lr(t) for t in (0, 5, 10)] == pytest.approx([0.1, 0.1, 0.1])
    assert pol.lr(11) == pytest.approx(0.01) and pol.lr(100) == pytest.approx(0.001)
    assert pol.lr(5000) == pytest.approx(0.001)
    mid = 11 + (100 - 11) // 2
    assert math.log(pol.lr(mid)) == pytest.approx(math.log(0.01) + (mid - 11) / 89 * math.log(0.1))
    assert LRPolicy(name="constant", lr0=0.02).lr(999) == 0.02


def test_policy_validation():
    with pytest.raises(ConfigError, match="'name'.*one of"):
        LRPolicy(name="cosine")
    with pytest.raises(ConfigError, match="lr_min"):
        LRPolicy(lr0=0.01, lr_min=0.1)
    with pytest.raises(ConfigError, match="knots"):
        LRPolicy(knots=((5, 0.1), (2, 0.01)))
    # Nested inside the experiment config, errors carry the full dotted path.
    with pytest.raises(ConfigError, match="prior.gd.policy.name"):
        GDConfig.from_dict({"policy": {"name": "cosine"}}, path="prior.gd")
    with pytest.raises(ConfigError, match="prior.gd.policy.power.*unknown"):
        GDConfig.from_dict({"policy": {"name": "linear", "power": 3}}, path="prior.gd")
    parsed = GDConfig.from_dict({"policy": {"name": "linear", "lr0": 1, "knots": [[0, 1]]}})
    assert type(parsed.policy.lr0) is float and parsed.policy.knots == ((0, 1.0),)
    with pytest.raises(ConfigError, match="sigmoid"):
        GDConfig(sigmoid=(1.0, 1.0, 0.0))


# ---------------------------------------------------------------------------------------- GD
@pytest.mark.parametrize("name", ["constant", "linear", "superlinear_v2", "geometric_knots"])
def test_gd_lowers_the_pairwise_potential_and_keeps_the_sigmoid_range(name):
    stats = _stats()
    cfg = GDConfig(policy=LRPolicy(name=name, lr0=0.02, total_steps=150))
    solver = GDSolver(GaussianPrior.from_statistics(stats), Objective(lam=20.0), cfg)
    prior, report = solver.run(stats, steps=150)
    assert report.merit_after < report.merit_before
    lo, hi = cfg.var_range
    assert (prior.var > lo).all() and (prior.var < hi).all()
    assert report.lrs == [cfg.policy.lr(t) for t in range(150)]


def test_gd_with_mean_pi_and_no_repulsion_reaches_the_class_means():
    stats = _stats()
    start = GaussianPrior(stats.mean() + 0.5, var=torch.full_like(stats.mean(), 1.0))
    cfg = GDConfig(policy=LRPolicy(name="constant", lr0=0.02))
    solver = GDSolver(start, Objective(lam=0.0, pi="mean"), cfg)
    prior, report = solver.run(stats, steps=400)
    assert report.merit_after < report.merit_before
    torch.testing.assert_close(prior.means, stats.mean(), atol=1e-3, rtol=0)
    torch.testing.assert_close(prior.var, stats.var(), atol=1e-3, rtol=0)  # inside (0.25, 1.25)


def test_gd_approaches_the_fpi_solution_of_the_same_objective():
    stats = _stats()
    objective = Objective(lam=20.0)
    fpi_prior, _ = solve_fpi(stats, objective, FPIConfig(update="mean", tol=1e-10))
    init = GaussianPrior.from_statistics(stats)
    solver = GDSolver(
        init, objective, GDConfig(update="mean", policy=LRPolicy(name="constant", lr0=0.01))
    )
    gd_prior, _ = solver.run(stats, steps=1500)
    # GD keeps the sigmoid-mapped variances; the FPI's mean-only fixed point uses the data
    # variances: compare on a GD run whose variances are frozen at the same representable values.
    ref, _ = solve_fpi(
        stats,
        objective,
        FPIConfig(update="mean", tol=1e-10),
        init=GaussianPrior(stats.mean(), var=solver.variances().detach()),
    )
    torch.testing.assert_close(gd_prior.means, ref.means, atol=2e-3, rtol=0)
    assert not torch.allclose(fpi_prior.means, stats.mean())  # the repulsion did move the means


def test_gd_state_round_trip_continues_identically():
    stats = _stats()
    a = GDSolver(GaussianPrior.from_statistics(stats), Objective(lam=10.0))
    a.run(stats, steps=7)
    b = GDSolver(GaussianPrior.standard(4, 3), Objective(lam=10.0))
    b.load_state_dict(a.state_dict())
    pa, _ = a.run(stats, steps=5)
    pb, _ = b.run(stats, steps=5)
    assert torch.equal(pa.means, pb.means) and torch.equal(pa.var, pb.var)


def test_released_gd_weight_schedule_is_linear_then_constant():
    """The release's GD weights: lambda 50 -> 25 linearly over the first 100 GD steps, then
    25; each step descends the objective at its own lambda."""
    stats = _stats()
    cfg = GDConfig(lam_end=25.0, lam_steps=100)
    sched = GDSolver(GaussianPrior.from_statistics(stats), Objective(lam=50.0), cfg)
    _, first = sched.run(stats, steps=60)
    _, second = sched.run(stats, steps=60)
    lams = first.lams + second.lams
    assert lams[0] == 50.0 and lams[50] == 37.5 and lams[100:] == [25.0] * 20
    assert all(a >= b for a, b in itertools.pairwise(lams))
    # Step 70 continued from its state with a fixed lambda = lambda(70) is the same step.
    a = GDSolver(GaussianPrior.from_statistics(stats), Objective(lam=50.0), cfg)
    a.run(stats, steps=70)
    fixed = GDSolver(GaussianPrior.standard(4, 3), Objective(lam=cfg.lam_at(50.0, 70)), GDConfig())
    fixed.load_state_dict(a.state_dict())
    pa, _ = a.run(stats, steps=1)
    pf, _ = fixed.run(stats, steps=1)
    assert torch.equal(pa.means, pf.means) and torch.equal(pa.var, pf.var)
    # Without a schedule every step uses the objective's lambda (equal objective with the FPI).
    _, plain = GDSolver(GaussianPrior.from_statistics(stats), Objective(lam=50.0)).run(stats, 5)
    assert plain.lams == [50.0] * 5
    with pytest.raises(ConfigError, match="lam_end"):
        GDConfig(lam_end=-1.0)


def test_gd_rejects_full_covariance():
    cov = torch.eye(2, dtype=torch.float64).expand(3, 2, 2)
    with pytest.raises(ShapeError):
        GDSolver(GaussianPrior(torch.zeros(3, 2), cov=cov), Objective())


# ------------------------------------------------------------------------------ PriorService
@pytest.mark.parametrize("method", ["fpi", "gd", "data-init"])
def test_service_versions_and_state_round_trip(method):
    stats = _stats()
    kwargs = {
        "objective": Objective(lam=5.0),
        "fpi": FPIConfig(tol=1e-8),
        "gd": GDConfig(steps_per_solve=3),
    }
    svc = PriorService(method, 4, 3, **kwargs)
    update = svc.initialize(stats)
    assert svc.version == update.version == 1
    torch.testing.assert_close(update.build().means, stats.mean())
    if method == "data-init":
        with pytest.raises(ConfigError, match="frozen"):
            svc.update(stats)
    else:
        svc.update(stats)
        assert svc.version == 2 and report_kind(svc.reports[-1]) == method
    clone = PriorService(method, 4, 3, **kwargs)
    clone.load_state_dict(svc.state_dict())
    assert clone.version == svc.version and clone.reports == svc.reports
    if method != "data-init":
        a, b = svc.update(stats).prior, clone.update(stats).prior
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_service_rejects_mismatched_statistics():
    svc = PriorService("fpi", 4, 3)
    with pytest.raises(ShapeError, match=r"\(K, d\)"):
        svc.update(_stats(k=3))
    with pytest.raises(ConfigError, match="prior.method"):
        PriorService("adam", 4, 3)


def test_service_reset_forgets_everything():
    svc = PriorService("gd", 4, 3, objective=Objective(lam=5.0), gd=GDConfig(steps_per_solve=2))
    stats = _stats()
    svc.initialize(stats)
    svc.update(stats)
    svc.reset()
    fresh = PriorService("gd", 4, 3, objective=Objective(lam=5.0), gd=GDConfig(steps_per_solve=2))
    assert svc.version == 0 and svc.reports == [] and svc.state_dict()["gd"] is None
    assert svc.initialize(stats).version == 1
    a, b = svc.update(stats).prior, (fresh.initialize(stats), fresh.update(stats))[1].prior
    assert all(torch.equal(a[k], b[k]) for k in a)
