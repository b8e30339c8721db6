"""The experiment loop: flow + class-gaussian prior, trained on one process or data-parallel.

Plain PyTorch. When ``torch.distributed`` is initialised (Ray Train does that) the same loop runs
data-parallel: each rank trains on its shard of every epoch's permutation under DDP, the class
statistics of all ranks are summed before a prior update (:mod:`nfpi.training.evaluation`), rank
0 hands them to the prior client and every rank receives the new prior
(:mod:`nfpi.training.schedule`), and only rank 0 writes files.

:class:`Trainer` is the flow's recipe for the epoch loop every model shares
(:func:`nfpi.epochs.fit_epochs`). Its parts, each with one job: the run's data
(:class:`~nfpi.training.run_data.RunData`), the prior's schedule
(:class:`~nfpi.training.schedule.PriorSchedule`), the checkpoint store
(:class:`~nfpi.checkpoint.CheckpointStore`) and the pictures (:mod:`nfpi.training.pictures`);
what is left here is the method itself: the start (data-init of the flow and the prior), an
epoch's training steps, the prior update, the evaluation, and what a checkpoint holds.

A run directory holds ``config.json``, ``metrics.jsonl`` (one line per finished epoch, always
the checkpoint's history), ``plots/`` and ``checkpoints/`` (:mod:`nfpi.checkpoint`). Every epoch
ends with a checkpoint; a re-launched run resumes exactly where it stopped. Before each save the
epoch is checked for divergence (non-finite or implausible metrics and weights,
:func:`nfpi.checkpoint.implausible`): a diverged epoch raises :class:`DivergenceError` and saves
nothing, so the last good checkpoint stays the newest one. A run directory is locked while a run
trains in it (:func:`nfpi.checkpoint.lock_run_dir`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from nfpi.checkpoint import (
    RESUMABLE_KEYS,
    CheckpointStore,
    config_differences,
    last_good_note,
    load_checkpoint,
    load_weights,
)
from nfpi.checks import check_batch_split
from nfpi.config import ExperimentConfig
from nfpi.data import dequantize, epoch_seed
from nfpi.epochs import EpochResult, fit_epochs
from nfpi.errors import CheckpointError, ConfigError, NonFiniteLossError
from nfpi.flows import FlowModel, build_flow
from nfpi.prior import ClassStatistics, GaussianPrior
from nfpi.training.distributed import (
    CommTimer,
    all_reduce_,
    barrier,
    resolve_device,
    world,
    wrap_ddp,
)
from nfpi.training.ema import FlowEMA
from nfpi.training.evaluation import collect_statistics, evaluate, keyed_inputs, nll_nats
from nfpi.training.finetune import load_pretrained_flow
from nfpi.training.heap import return_freed_memory
from nfpi.training.pictures import prior_update_pictures, sample_and_tsne_pictures
from nfpi.training.randomness import (
    PHASE_STATS,
    PHASE_TRAIN,
    get_rng_state,
    seed_phase,
    set_rng_state,
)
from nfpi.training.run_data import RunData
from nfpi.training.schedule import PriorClient, PriorSchedule, report_metrics

__all__ = ["WALL_CLOCK_KEYS", "Callback", "EpochResult", "Trainer", "is_wall_clock"]

#: Metrics that measure time, not the run: they differ between two runs of the same state.
WALL_CLOCK_KEYS = frozenset({"epoch_seconds", "prior_stats_s", "prior_refresh_s"})


def is_wall_clock(key: str) -> bool:
    """Whether a metrics key is a wall-clock time (the above, or a per-phase ``time_*``)."""
    return key in WALL_CLOCK_KEYS or key.startswith("time_")


log = logging.getLogger(__name__)

Callback = Callable[["Trainer", EpochResult], None]


def _data(name: str) -> property:
    """``Trainer.<name>``: the run data's (:class:`RunData`)."""
    return property(lambda self: getattr(self.data, name), doc=f"``data.{name}``")


class Trainer:
    """One experiment. ``Trainer(config, run_dir).fit()`` trains, evaluates, checkpoints, plots.

    Args:
        config: the experiment.
        run_dir: where the run's files go (rank 0 writes; created if missing).
        prior_client: who solves the prior on rank 0 (default: an in-process PriorService).
        callbacks: called as ``callback(trainer, EpochResult)`` at every epoch end, on all ranks.
        device: overrides ``config.device`` (e.g. the device Ray Train assigns).
        resume_from: a checkpoint to resume from (see :func:`nfpi.checkpoint.find_checkpoint`;
            ``--resume-from``); a run that holds its run directory's lock makes it the run
            directory's newest first (:func:`nfpi.checkpoint.select_checkpoint`). Default: the
            run directory's newest checkpoint that verifies; a run directory with history but
            none raises :class:`CheckpointError` (:func:`nfpi.checkpoint.resume_checkpoint`).
        fresh: start at epoch 0 even over an earlier run's history, which is moved to
            ``run_dir/previous-<time>/`` first (``--fresh``; not with ``resume_from``).
        resume_overrides: dotted keys of :data:`nfpi.checkpoint.RESUMABLE_KEYS` (``optim.lr``,
            ``optim.grad_clip``, ``optim.warmup_steps``, ``optim.epochs``) applied on top of
            ``config``: a checkpoint whose config differs from it only in those keys is
            accepted, and after loading it the new learning rate goes into the optimiser's
            parameter groups and the scheduler (``--resume-with optim.lr=...``, what a diverged
            run needs). Without a checkpoint they simply set those keys of a fresh run.
        lock_run_dir: hold the run directory's lock during :meth:`fit` (rank 0). ``False`` when
            the caller holds it already (the Ray driver does, for all workers of its run).
    """

    train_set = _data("train_set")
    test_set = _data("test_set")
    info = _data("info")
    num_classes = _data("num_classes")
    dim = _data("dim")
    augment = _data("augment")
    train_sampler = _data("train_sampler")
    train_loader = _data("train_loader")
    stats_loader = _data("stats_loader")
    test_loader = _data("test_loader")

    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: str | Path,
        *,
        prior_client: PriorClient | None = None,
        callbacks: Iterable[Callback] = (),
        device: torch.device | str | None = None,
        resume_from: str | Path | None = None,
        resume_overrides: Mapping[str, Any] | None = None,
        lock_run_dir: bool = True,
        fresh: bool = False,
    ) -> None:
        if fresh and resume_from is not None:
            raise ConfigError("fresh", True, "either fresh (start at epoch 0) or resume_from")
        self.fresh = fresh
        self.resume_overrides = dict(resume_overrides or {})
        unknown = sorted(set(self.resume_overrides) - set(RESUMABLE_KEYS))
        if unknown:
            raise ConfigError(
                "resume_overrides",
                unknown,
                f"only {', '.join(RESUMABLE_KEYS)} may change on resume; any other change "
                "needs a fresh run directory",
            )
        c = self.config = config.with_overrides(self.resume_overrides).resolved()
        self.lock_run_dir = lock_run_dir
        self.rank, self.world = world()
        self.device = torch.device(device) if device is not None else resolve_device(c.device)
        self.callbacks = list(callbacks)
        self.store = CheckpointStore(run_dir, main=self.is_main, sync=barrier)
        self.run_dir = self.store.run_dir
        self.resume_from = Path(resume_from) if resume_from is not None else None
        check_batch_split(c.optim.batch_size, self.world)
        self.data = RunData(c, self.device, self.rank, self.world)
        # Model: every rank builds the same flow (seeded) and data-initialises it on the same batch.
        self.flow: FlowModel = build_flow(
            c.flow.preset, in_shape=tuple(self.info.shape), seed=c.seed, **c.flow.overrides()
        ).to(self.device)
        self.flow.invertible_backward = c.optim.invertible_backward
        if c.optim.invertible_backward and self.device.type == "cpu":
            return_freed_memory()  # the memory saved goes back to the OS (nfpi.training.heap)
        self.model: nn.Module = self.flow  # the DDP wrapper once training starts
        if prior_client is None and self.is_main:
            prior_client = PriorSchedule.default_client(c.prior, self.num_classes, self.dim)
        self.schedule = PriorSchedule(
            c.prior, prior_client if self.is_main else None, self.num_classes, self.dim, self.device
        )
        self.optimizer = torch.optim.Adamax(self.flow.parameters(), lr=c.optim.lr)
        warm = max(c.optim.warmup_steps, 1)
        self._warmup: Callable[[int], float] = lambda s: min(1.0, (s + 1) / warm)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._warmup)
        self.ema = FlowEMA(self.flow, c.ema)
        self.epoch, self.step = 0, 0
        self.gathered_stats: ClassStatistics | None = None  # see _train_epoch
        self.history: list[dict[str, float]] = []
        self.resumed_from: Path | None = None  # the checkpoint this run resumed from, if any
        self.comm = CommTimer()
        # This rank's seconds per phase of the epoch just finished (read by callbacks): the
        # ``time_*`` metrics plus ``checkpoint_s`` (rank 0's save), ``barrier_s`` (waiting for
        # the other ranks at the epoch's end), ``train_cpu_s`` (process CPU time of training: all
        # threads, communication threads included) and ``train_thread_cpu_s`` (this thread's).
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------------------------- fit
    def fit(self) -> list[dict[str, float]]:
        """Train to ``optim.epochs`` (resuming if a checkpoint exists); returns the per-epoch
        metrics history.

        Raises:
            RunDirectoryLockedError: another live process trains in this run directory.
            DivergenceError: an epoch diverged (nothing of it saved; see the message).
        """
        with self.store.locked(self.lock_run_dir):
            resume, state = self.store.resume(
                self.resume_from,
                fresh=self.fresh,
                holds_lock=self.lock_run_dir,
                map_location=self.device,
            )
            if resume is not None:
                self.load_checkpoint(resume, state)
                self.resumed_from = Path(resume)
            else:
                if self.resume_overrides:
                    self._info("no checkpoint to resume: %s set a fresh run", self.resume_overrides)
                self._start()
            # After the resume: metrics.jsonl holds the checkpoint's history from the start.
            self.store.write_config(self.config.to_dict())
            self.store.write_metrics(self.history)
            self.model = wrap_ddp(self.flow, self.device, self.comm)
            return fit_epochs(
                self,
                self.config.optim.epochs,
                store=self.store,
                callbacks=[self._epoch_done],
                sync=barrier,
                main=self.is_main,
            )

    def run_epoch(self, epoch: int) -> EpochResult:
        """One epoch of the method: the EMA's start when due, the training steps, the prior's
        update when due, its separation, the evaluation and the pictures when due."""
        c = self.config
        t0, cpu0, thread0 = time.perf_counter(), time.process_time(), time.thread_time()
        result = EpochResult(epoch, {"epoch": float(epoch)})
        metrics = result.metrics
        self.comm.reset()
        if epoch == c.ema.start_epoch and not self.ema.active:
            self.ema.start()
        metrics.update(self._train_epoch(epoch))
        metrics["time_train_s"] = time.perf_counter() - t0
        metrics["time_allreduce_s"] = self.comm.reset()[0]
        result.timings["train_cpu_s"] = time.process_time() - cpu0
        result.timings["train_thread_cpu_s"] = time.thread_time() - thread0
        if self.schedule.due(epoch):
            prior_metrics, result.artifacts = self._prior_update(epoch)
            metrics.update(prior_metrics)
            result.prior_report = self.schedule.report
        metrics["prior_version"] = float(self.schedule.version)
        metrics.update(self.schedule.separation())
        last = epoch == c.optim.epochs - 1
        if (epoch + 1) % c.eval.every == 0 or last:
            t_eval = time.perf_counter()
            metrics.update(
                evaluate(
                    self.eval_flow(), self.prior, self.test_loader, self.device, c.seed,
                    self.info.levels,
                )
            )  # fmt: skip
            metrics["time_eval_s"] = time.perf_counter() - t_eval
        plot_now = last or (c.eval.plot_every and (epoch + 1) % c.eval.plot_every == 0)
        if self.is_main and c.eval.plots and plot_now:
            result.artifacts += self._pictures(last, epoch)
        return result

    def _epoch_done(self, result: EpochResult) -> None:
        """After the epoch's checkpoint: its :attr:`timings`, then the callbacks."""
        self.timings = {
            **{k: v for k, v in result.metrics.items() if k.startswith(("time_", "prior_"))},
            **{k: result.timings[k] for k in ("checkpoint_s", "barrier_s")},
            **{k: result.timings[k] for k in ("train_cpu_s", "train_thread_cpu_s")},
        }
        for callback in self.callbacks:
            callback(self, result)

    # ------------------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def prior(self) -> GaussianPrior:
        """The current prior (owned by :attr:`schedule`)."""
        return self.schedule.prior

    def _info(self, msg: str, *args: Any) -> None:
        if self.is_main:
            log.info(msg, *args)

    def eval_flow(self) -> nn.Module:
        """The EMA flow once the EMA runs, the online flow before."""
        return self.ema.model()

    def _statistics(self, flow: nn.Module, epoch: int) -> ClassStatistics:
        was_training = flow.training
        flow.eval()
        try:
            return collect_statistics(
                flow,
                self.stats_loader,
                self.num_classes,
                self.device,
                seed=epoch_seed(self.config.seed, 2 * epoch + PHASE_STATS),
                shift=self.prior.means,
                full=self.config.prior.covariance == "full",
                augment=self.augment if self.config.prior.stats_augment else None,
                levels=self.info.levels,
                nll_prior=self.prior if self.config.prior.gd_form_released else None,
            )
        finally:
            flow.train(was_training)

    # -------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain values (``weights_only`` loadable)."""
        return {
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "flow": self.flow.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "prior": self.prior.state_dict(),
            "schedule": self.schedule.state_dict(),
            "history": self.history,
            "data_info": dataclasses.asdict(self.info),
            "rng": get_rng_state(),
        }

    def guarded_state(self) -> dict[str, Any]:
        """What the divergence guard checks after every epoch (:func:`nfpi.epochs.fit_epochs`):
        the flow, its EMA, the optimiser and the prior (identical on every rank)."""
        return {
            "flow": self.flow.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "prior": self.prior.state_dict(),
        }

    def load_checkpoint(self, path: str | Path, state: dict[str, Any] | None = None) -> None:
        """Resume from the checkpoint at ``path`` (``state``: its contents, already loaded); it
        must come from the same experiment (only ``optim.epochs`` and the keys of
        ``resume_overrides`` may differ)."""
        if state is None:
            state = load_checkpoint(path, map_location=self.device)
        file = state["_file"]
        saved = ExperimentConfig.from_dict(state["config"]).flat()
        allowed = ("optim.epochs", *self.resume_overrides)
        diff = config_differences(saved, self.config.flat(), allowed)
        if diff:
            resumable = [k for k in diff if k in RESUMABLE_KEYS]
            hint = (
                f"; to change {', '.join(resumable)} on resume say so explicitly: "
                + " ".join(f"--resume-with {k}=..." for k in resumable)
                + " (Trainer(resume_overrides=...))"
                if resumable
                else ""
            )
            raise CheckpointError(
                f"checkpoint {file} was written by a different config: {diff} (saved, now); "
                f"use a fresh run directory or the same config{hint}"
            )
        load_weights(self.flow, state["flow"], state)
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        set_rng_state(state["rng"])
        if {"optim.lr", "optim.warmup_steps"} & set(self.resume_overrides):
            self._restart_schedule()
        changed = {k: (saved.get(k), v) for k, v in self.config.flat().items() if k in allowed}
        changed = {k: v for k, v in changed.items() if v[0] != v[1]}
        self._info(
            "resumed from %s at epoch %d (step %d)%s",
            file,
            self.epoch,
            self.step,
            f" with {changed} (saved, now)" if changed else "",
        )

    def _restart_schedule(self) -> None:
        """The learning-rate schedule of ``config.optim`` (new ``lr``/``warmup_steps``) at the
        loaded step: the base rate into every parameter group, and a scheduler rebuilt at
        ``last_epoch`` so that its next rates are the new ones (Adamax's moments are kept)."""
        last = self.scheduler.last_epoch
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.optim.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, self._warmup, last_epoch=last - 1
        )  # its first step sets the rate of step ``last`` from the new base rate

    # ------------------------------------------------------------------------------- phases
    def _start(self) -> None:
        """Fresh run: data-init of the flow (same batch on every rank) and of the prior."""
        c = self.config
        gen = torch.Generator().manual_seed(c.seed)
        count = min(c.optim.init_batch, len(self.train_set))
        idx = torch.randperm(len(self.train_set), generator=gen)[:count]
        batch = torch.stack([self.train_set[int(i)][0] for i in idx])
        seed = epoch_seed(c.seed, PHASE_STATS)
        if c.flow.init_from is not None:  # fine-tune: the pretrained flow's weights, no data-init
            file, done = load_pretrained_flow(self.flow, c.flow.init_from, self.device)
            self._info("flow weights from %s (pretrained for %d epochs)", file, done)
        else:
            self.flow.data_init(
                keyed_inputs(batch, idx, seed, self.augment, self.device, self.info.levels)
            )
        # The prior: data-init from this flow (fresh or loaded) on this run's data and classes.
        stats = self._statistics(self.flow, epoch=0)
        self.schedule.initialize(stats)
        if c.prior.method != "fpi" and c.ema.start_epoch is None:
            self.ema.start()  # the FPI's EMA starts after its first solve
        self._info(
            "prior data-init (v%d) from %d samples", self.schedule.version, int(stats.count.sum())
        )

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        c = self.config
        gen = seed_phase(c.seed, epoch, PHASE_TRAIN)
        self.train_sampler.set_epoch(epoch)
        self.model.train()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        # prior.stats_from_training: the class statistics of this epoch's training latents,
        # for the prior update at its end (instead of a separate pass).
        gathered = None
        if c.prior.stats_from_training and self.schedule.due(epoch):
            gathered = ClassStatistics.empty(
                self.num_classes,
                self.dim,
                shift=self.prior.means,
                full=c.prior.covariance == "full",
                device=self.device,
            )
        self.gathered_stats = None
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch}",
            leave=False,
            disable=not (self.is_main and sys.stderr.isatty()),
        )
        for x, y in bar:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.augment is not None:
                x = self.augment(x, gen)
            x = dequantize(x, levels=self.info.levels)
            nll, z = nll_nats(self.model, self.prior, x, y, self.info.levels)
            loss = nll.mean() / (self.dim * math.log(2))  # bits/dim
            if not torch.isfinite(loss):
                last, note = last_good_note(self.run_dir)
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch}, step {self.step}: the run "
                    f"diverged; {note}",
                    None if last is None else str(last),
                )
            if gathered is not None:
                gathered.update_(z, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.optim.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.flow.parameters(), c.optim.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.ema.update()
            totals += torch.stack(
                [loss.detach().double() * len(y), torch.tensor(float(len(y)), device=self.device)]
            )
            bar.set_postfix(bpd=f"{loss.item():.3f}")
        all_reduce_(totals)
        if gathered is not None:
            self.gathered_stats = (
                gathered.with_flat(all_reduce_(gathered.flat())) if self.world > 1 else gathered
            )
        return {"train_bpd": float(totals[0] / totals[1]), "lr": self.scheduler.get_last_lr()[0]}

    def _prior_update(self, epoch: int) -> tuple[dict[str, float], list[Path]]:
        before = self.prior.clone()
        t0 = time.perf_counter()
        stats = self.gathered_stats  # prior.stats_from_training: all-reduced already
        if stats is None:
            stats = self._statistics(self.flow, epoch)  # includes the all-reduce
        t1 = time.perf_counter()
        update = self.schedule.update(stats)
        metrics = {
            "prior_stats_s": t1 - t0,
            "prior_refresh_s": time.perf_counter() - t1,
            **report_metrics(update.report),
        }
        if update.kind == "fpi" and not self.ema.active and self.config.ema.start_epoch is None:
            # The EMA starts from the online weights that produced the solved prior (release).
            self.ema.start()
        artifacts: list[Path] = []
        if self.is_main and self.config.eval.plots and update.kind == "fpi":
            artifacts = prior_update_pictures(
                before, self.prior, update.report, update.version, self.info.class_names,
                self.run_dir / "plots",
            )  # fmt: skip
        return metrics, artifacts

    def _pictures(self, last: bool, epoch: int) -> list[Path]:
        c = self.config
        tag = "" if last else f"_epoch{epoch}"
        paths = sample_and_tsne_pictures(
            self.eval_flow(),
            self.prior,
            self.test_loader,
            self.info.class_names,
            self.run_dir / "plots",
            temperatures=c.eval.temperatures,
            samples_per_class=c.eval.samples_per_class,
            tsne_points=c.eval.tsne_points,
            seed=c.seed,
            tag=tag,
            levels=self.info.levels,
        )
        if last and self.schedule.initial is not None:
            # Every prior method, under one name: the data-init prior against the final one.
            paths += prior_update_pictures(
                self.schedule.initial, self.prior, None, self.schedule.version,
                self.info.class_names, self.run_dir / "plots", name="final",
                titles=("data-init prior", "final prior"),
            )  # fmt: skip
        return paths
