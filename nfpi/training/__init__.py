"""Training: the loop, the prior's schedule, evaluation and the pictures of a run.

Owns how a flow and its class-gaussian prior are trained together, on one process or
data-parallel under ``torch.distributed``: :class:`Trainer` (the flow's recipe for the shared
epoch loop :func:`nfpi.epochs.fit_epochs`, :mod:`.loop`), the run's datasets and loaders
(:mod:`.run_data`), when and by whom the prior is updated (:class:`PriorSchedule`, :class:`PriorClient`, :mod:`.schedule`),
what is measured (class statistics, NF-Acc, bits/dim, :mod:`.evaluation`), the EMA of the flow
(:mod:`.ema`), the few collective operations (:mod:`.distributed`), epoch-keyed randomness
(:mod:`.randomness`) and the run's pictures (:mod:`.pictures`). Checkpoints are read and written
by :mod:`nfpi.checkpoint` (its :class:`~nfpi.checkpoint.CheckpointStore`); nothing here imports Ray or MLflow.
"""

from nfpi.training.evaluation import collect_statistics, evaluate
from nfpi.training.loop import WALL_CLOCK_KEYS, Callback, EpochResult, Trainer, is_wall_clock
from nfpi.training.schedule import PriorClient, PriorSchedule, report_metrics

__all__ = [
    "WALL_CLOCK_KEYS",
    "Callback",
    "EpochResult",
    "PriorClient",
    "PriorSchedule",
    "Trainer",
    "collect_statistics",
    "evaluate",
    "is_wall_clock",
    "report_metrics",
]
