"""The class-conditional gaussian prior, its statistics and its solvers (FPI and GD)."""

from nfpi.prior.fpi import FPIConfig, FPIReport, fpi_step, initial_prior, solve_fpi
from nfpi.prior.gaussian import Covariance, GaussianPrior
from nfpi.prior.gd import POLICY_POWERS, GDConfig, GDReport, GDSolver, LRPolicy
from nfpi.prior.kl import pairwise_kl, pairwise_kl_diag, pairwise_kl_full
from nfpi.prior.objective import (
    PiMode,
    class_nll,
    kappa,
    kld_repulsion,
    pairwise_potential,
    prior_objective,
    repulsion_weights,
)
from nfpi.prior.service import PriorMethod, PriorService, PriorUpdate
from nfpi.prior.stats import ClassStatistics

__all__ = [
    "POLICY_POWERS",
    "ClassStatistics",
    "Covariance",
    "FPIConfig",
    "FPIReport",
    "GDConfig",
    "GDReport",
    "GDSolver",
    "GaussianPrior",
    "LRPolicy",
    "PiMode",
    "PriorMethod",
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
    "repulsion_weights",
    "solve_fpi",
]
