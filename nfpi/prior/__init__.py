"""The class-conditional gaussian prior, its statistics and its solvers (FPI and GD).

Owns everything about p(z | y) = N(z; mu_y, Sigma_y): the mergeable class statistics of latents
(:class:`ClassStatistics`), the prior itself (:class:`GaussianPrior`), pairwise KLs, the objective
of Proposition 1 (:class:`Objective`: lambda, alpha, pi, shared by both solvers), the fixed-point
solver (:func:`solve_fpi`, with its :class:`AndersonMixer`), the gradient-descent baseline
(:class:`GDSolver`), and the :class:`PriorService` that holds the prior during training. Pure
functions of statistics: no I/O, no global state, float64 throughout.
"""

from nfpi.prior.anderson import AndersonMixer
from nfpi.prior.fpi import (
    DEFAULT_BOUND_FACTORS,
    FPIConfig,
    FPIReport,
    fpi_step,
    initial_prior,
    solve_fpi,
)
from nfpi.prior.gaussian import Covariance, GaussianPrior
from nfpi.prior.gd import POLICY_POWERS, GDConfig, GDReport, GDSolver, LRPolicy
from nfpi.prior.kl import pairwise_kl, pairwise_kl_diag, pairwise_kl_full
from nfpi.prior.objective import (
    Objective,
    PiMode,
    class_nll,
    kappa,
    kld_repulsion,
    pairwise_potential,
    prior_objective,
    repulsion_weights,
)
from nfpi.prior.service import (
    PRIOR_METHODS,
    InitReport,
    PriorMethod,
    PriorReport,
    PriorService,
    PriorUpdate,
    report_from_dict,
    report_kind,
    report_to_dict,
)
from nfpi.prior.stats import ClassStatistics

__all__ = [
    "DEFAULT_BOUND_FACTORS",
    "POLICY_POWERS",
    "PRIOR_METHODS",
    "AndersonMixer",
    "ClassStatistics",
    "Covariance",
    "FPIConfig",
    "FPIReport",
    "GDConfig",
    "GDReport",
    "GDSolver",
    "GaussianPrior",
    "InitReport",
    "LRPolicy",
    "Objective",
    "PiMode",
    "PriorMethod",
    "PriorReport",
    "PriorService",
    "PriorUpdate",
    "class_nll",
    "fpi_step",
    "initial_prior",
    "kappa",
    "kld_repulsion",
    "pairwise_kl",
    "pairwise_kl_diag",
    "pairwise_kl_full",
    "pairwise_potential",
    "prior_objective",
    "report_from_dict",
    "report_kind",
    "report_to_dict",
    "repulsion_weights",
    "solve_fpi",
]
