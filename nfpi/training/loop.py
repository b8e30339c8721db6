"""The experiment loop: flow + class-gaussian prior, trained on one process or data-parallel.

Plain PyTorch. When ``torch.distributed`` is initialised (Ray Train does that) the same loop runs
data-parallel: each rank trains on its shard of every epoch's permutation under DDP, the class
statistics of all ranks are summed before a prior update (:mod:`nfpi.training.evaluation`), rank
0 hands them to the prior client and every rank receives the new prior
(:mod:`nfpi.training.schedule`), and only rank 0 writes files.

A run directory holds ``config.json``, ``metrics.jsonl`` (one line per finished epoch, always
the checkpoint's history), ``plots/`` and ``checkpoints/`` (:mod:`nfpi.checkpoint`). Every epoch
ends with a checkpoint; a re-launched run resumes exactly where it stopped. Before each save the
epoch is checked for divergence (non-finite or implausible metrics and weights,
:func:`nfpi.checkpoint.implausible`): a diverged epoch raises :class:`DivergenceError` and saves
nothing, so the last good checkpoint stays the newest one. A run directory is locked while a run
trains in it (:func:`nfpi.checkpoint.lock_run_dir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from nfpi.checkpoint import (
    RESUMABLE_KEYS,
    config_differences,
    implausible,
    last_good_note,
    load_checkpoint,
    load_weights,
    lock_run_dir,
    resume_checkpoint,
    save_checkpoint,
    select_checkpoint,
    set_aside_history,
)
from nfpi.checks import check_batch_split
from nfpi.config import ExperimentConfig
from nfpi.data import (
    BatchAugment,
    DecodedCache,
    ImageDataset,
    ImageFileDataset,
    cache_root,
    dequantize,
    epoch_seed,
    load_dataset,
)
from nfpi.data.load import NO_FLIP
from nfpi.data.sharding import EpochShardSampler, IndexedDataset, ShardSampler
from nfpi.errors import CheckpointError, ConfigError, DivergenceError, NonFiniteLossError
from nfpi.flows import FlowModel, build_flow
from nfpi.prior import ClassStatistics, GaussianPrior, PriorReport
from nfpi.training.distributed import (
    CommTimer,
    all_reduce_,
    barrier,
    broadcast_object,
    resolve_device,
    world,
    wrap_ddp,
)
from nfpi.training.ema import FlowEMA
from nfpi.training.evaluation import collect_statistics, evaluate, keyed_inputs, nll_nats
from nfpi.training.finetune import load_pretrained_flow
from nfpi.training.pictures import prior_update_pictures, sample_and_tsne_pictures
from nfpi.training.randomness import (
    PHASE_STATS,
    PHASE_TRAIN,
    get_rng_state,
    seed_phase,
    set_rng_state,
)
from nfpi.training.schedule import PriorClient, PriorSchedule, report_metrics

__all__ = ["WALL_CLOCK_KEYS", "Callback", "EpochResult", "Trainer", "is_wall_clock"]

#: Metrics that measure time, not the run: they differ between two runs of the same state.
WALL_CLOCK_KEYS = frozenset({"epoch_seconds", "prior_stats_s", "prior_refresh_s"})


def is_wall_clock(key: str) -> bool:
    """Whether a metrics key is a wall-clock time (the above, or a per-phase ``time_*``)."""
    return key in WALL_CLOCK_KEYS or key.startswith("time_")


log = logging.getLogger(__name__)


@dataclass
class EpochResult:
    """Handed to every callback at the end of an epoch, on every rank.

    ``checkpoint_dir`` (rank 0 only) holds the checkpoint just written; ``artifacts`` the PNGs
    written this epoch; ``prior_report`` the report of a prior update made this epoch.
    """

    epoch: int
    metrics: dict[str, float]
    checkpoint_dir: Path | None = None
    artifacts: list[Path] = field(default_factory=list)
    prior_report: PriorReport | None = None


Callback = Callable[["Trainer", EpochResult], None]


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
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.resume_from = Path(resume_from) if resume_from is not None else None
        check_batch_split(c.optim.batch_size, self.world)
        self._build_data()
        # Model: every rank builds the same flow (seeded) and data-initialises it on the same batch.
        self.flow: FlowModel = build_flow(
            c.flow.preset, in_shape=tuple(self.info.shape), seed=c.seed, **c.flow.overrides()
        ).to(self.device)
        self.flow.invertible_backward = c.optim.invertible_backward
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

    def _build_data(self) -> None:
        """Datasets, augmentation and loaders. The training set (augmented) feeds training and
        the statistics passes, as in the release; the test set is never augmented."""
        c = self.config
        data = c.data
        self.train_set, self.info = load_dataset(
            data.name, "train", seed=c.seed, **data.split_kwargs("train")
        )
        self.test_set, _ = load_dataset(data.name, "test", seed=c.seed, **data.split_kwargs("test"))
        if c.data.decode_cache:
            self.train_set = self._decoded(self.train_set)
            self.test_set = self._decoded(self.test_set)
        if len(self.train_set) < c.optim.batch_size:
            raise ConfigError(
                "optim.batch_size",
                c.optim.batch_size,
                f"<= the training set size ({len(self.train_set)})",
            )
        self.num_classes, self.dim = self.info.num_classes, math.prod(self.info.shape)
        # The paper's augmentation, drawn per image but applied per batch on the device.
        self.augment = (
            BatchAugment(self.info.shape, flip=c.data.name not in NO_FLIP)
            if c.data.augment
            else None
        )
        self.train_sampler = EpochShardSampler(
            len(self.train_set), seed=c.seed, rank=self.rank, world=self.world
        )
        loader_kw = {"num_workers": c.data.num_workers, "pin_memory": self.device.type == "cuda"}
        self.train_loader = DataLoader(
            self.train_set,
            c.optim.batch_size // self.world,
            sampler=self.train_sampler,
            drop_last=True,
            **loader_kw,
        )

        def shard(ds: Any) -> ShardSampler:
            return ShardSampler(len(ds), rank=self.rank, world=self.world)

        self.stats_loader = DataLoader(
            IndexedDataset(self.train_set),
            c.eval.batch_size,
            sampler=shard(self.train_set),
            **loader_kw,
        )
        self.test_loader = DataLoader(
            self.test_set, c.eval.batch_size, sampler=shard(self.test_set), **loader_kw
        )

    def _decoded(self, dataset: ImageDataset) -> ImageDataset:
        """``dataset`` backed by its decoded cache (:mod:`nfpi.data.cache`), built together by
        all ranks when missing: each decodes one block, rank 0 publishes the file."""
        if not isinstance(dataset, ImageFileDataset):
            return dataset
        cache = DecodedCache(cache_root(self.config.data.cache_dir), dataset)
        # Rank 0 holds the build lock (other runs wanting this cache wait, then find it ready)
        # and decides for all ranks: their disks may differ.
        with cache.lock() if self.is_main else contextlib.nullcontext():
            state = broadcast_object(cache.state() if self.is_main else None)
            if state == "build":
                if self.is_main:
                    cache.prepare()
                barrier()
                cache.fill(self.rank, self.world, num_workers=self.config.data.num_workers)
                barrier()
                if self.is_main:
                    cache.finish(self.world)
                barrier()
        return dataset if state == "skip" else cache.open()

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

    def _write_run_files(self, metrics_only: bool = False) -> None:
        """config.json and metrics.jsonl (rewritten from the history: after a resume it holds
        exactly the epochs the checkpoint holds)."""
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not metrics_only:
            (self.run_dir / "config.json").write_text(
                json.dumps(self.config.to_dict(), indent=2, default=str)
            )
        tmp = self.run_dir / "metrics.jsonl.tmp"
        try:
            tmp.write_text("".join(json.dumps(m) + "\n" for m in self.history))
            os.replace(tmp, self.run_dir / "metrics.jsonl")
        finally:
            tmp.unlink(missing_ok=True)  # interrupted (SIGTERM) or a full disk: no stale .tmp

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

    # ---------------------------------------------------------------------------------- fit
    def _refuse_divergence(self, epoch: int, metrics: dict[str, float]) -> None:
        """Raise :class:`DivergenceError` (on every rank alike: metrics are all-reduced and
        weights identical) if this epoch's metrics or state are not finite and plausible."""
        problems = implausible(
            {"flow": self.flow.state_dict(), "ema": self.ema.state_dict(),
             "optimizer": self.optimizer.state_dict(), "prior": self.prior.state_dict()},
            metrics,
        )  # fmt: skip
        if problems:
            last, note = last_good_note(self.run_dir)
            raise DivergenceError(
                f"epoch {epoch} diverged ({'; '.join(problems)}); nothing of it was saved and "
                f"{note}",
                None if last is None else str(last),
            )

    def fit(self) -> list[dict[str, float]]:
        """Train to ``optim.epochs`` (resuming if a checkpoint exists); returns the per-epoch
        metrics history.

        Raises:
            RunDirectoryLockedError: another live process trains in this run directory.
            DivergenceError: an epoch diverged (nothing of it saved; see the message).
        """
        locked = self.lock_run_dir and self.is_main
        with lock_run_dir(self.run_dir) if locked else nullcontext():
            return self._fit()

    def _fit(self) -> list[dict[str, float]]:
        c = self.config
        resume, state = self.resume_from, None
        if self.fresh:
            if self.is_main:
                set_aside_history(self.run_dir)
            barrier()
        elif resume is not None and self.lock_run_dir and self.is_main:
            resume = select_checkpoint(self.run_dir, resume)  # also what a later resume takes
        elif resume is None:
            resume, state = resume_checkpoint(self.run_dir, map_location=self.device)
        if resume is not None:
            self.load_checkpoint(resume, state)
            self.resumed_from = Path(resume)
        else:
            if self.resume_overrides:
                self._info("no checkpoint to resume: %s set a fresh run", self.resume_overrides)
            self._start()
        # After the resume: metrics.jsonl holds the checkpoint's history from the start.
        self._write_run_files()
        self.model = wrap_ddp(self.flow, self.device, self.comm)
        for epoch in range(self.epoch, c.optim.epochs):
            t0, cpu0, thread0 = time.perf_counter(), time.process_time(), time.thread_time()
            metrics: dict[str, float] = {"epoch": float(epoch)}
            self.comm.reset()
            if epoch == c.ema.start_epoch and not self.ema.active:
                self.ema.start()
            metrics.update(self._train_epoch(epoch))
            metrics["time_train_s"] = time.perf_counter() - t0
            metrics["time_allreduce_s"] = self.comm.reset()[0]
            train_cpu_s = time.process_time() - cpu0
            train_thread_s = time.thread_time() - thread0
            artifacts: list[Path] = []
            report = None
            if self.schedule.due(epoch):
                prior_metrics, artifacts = self._prior_update(epoch)
                metrics.update(prior_metrics)
                report = self.schedule.report
            metrics["prior_version"] = float(self.schedule.version)
            metrics.update(self.schedule.separation())
            last = epoch == c.optim.epochs - 1
            if (epoch + 1) % c.eval.every == 0 or last:
                t_eval = time.perf_counter()
                metrics.update(
                    evaluate(
                        self.eval_flow(),
                        self.prior,
                        self.test_loader,
                        self.device,
                        c.seed,
                        self.info.levels,
                    )
                )
                metrics["time_eval_s"] = time.perf_counter() - t_eval
            plot_now = last or (c.eval.plot_every and (epoch + 1) % c.eval.plot_every == 0)
            if self.is_main and c.eval.plots and plot_now:
                artifacts += self._pictures(last, epoch)
            metrics["epoch_seconds"] = time.perf_counter() - t0
            self._refuse_divergence(epoch, metrics)
            self.epoch = epoch + 1
            self.history.append(metrics)
            t_save = time.perf_counter()
            ckpt = save_checkpoint(self.run_dir, self.state_dict()) if self.is_main else None
            self._write_run_files(metrics_only=True)
            t_barrier = time.perf_counter()
            barrier()
            self.timings = {
                **{k: v for k, v in metrics.items() if k.startswith(("time_", "prior_"))},
                "checkpoint_s": t_barrier - t_save,
                "barrier_s": time.perf_counter() - t_barrier,
                "train_cpu_s": train_cpu_s,
                "train_thread_cpu_s": train_thread_s,
            }
            self._info(
                "epoch %d: %s",
                epoch,
                ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"),
            )
            result = EpochResult(epoch, metrics, ckpt, artifacts, report)
            for callback in self.callbacks:
                callback(self, result)
        return self.history
