"""The experiment loop: flow + class-gaussian prior, trained on one process or data-parallel.

Plain PyTorch. When ``torch.distributed`` is initialised (Ray Train does that) the same loop runs
data-parallel: each rank trains on its shard of every epoch's permutation under DDP, the class
statistics of all ranks are summed with ``all_reduce`` before a prior update, rank 0 hands them
to the prior client (an in-process :class:`~nfpi.prior.PriorService`, or a Ray actor in
``ray_jobs/``) and broadcasts the new prior, and only rank 0 writes files.

Prior schedule (method notes section 5): data-init from the untrained flow at train start; FPI
solved at the end of epoch ``prior.solve_epoch`` (then frozen or re-solved every
``prior.resolve_every`` epochs); GD steps at the end of every epoch for the GD baseline; nothing
more for data-init. The EMA of the flow starts after the first FPI solve (from the start for the
other methods). NF-Acc and test bits/dim use the EMA flow on the un-augmented test set.

Every epoch writes ``checkpoint/state.pt`` atomically (flow, EMA, optimiser, scheduler, prior
service, epoch/step, RNG states, config): a re-launched run resumes exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from ema_pytorch import EMA
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from nfpi import plots
from nfpi.config import ExperimentConfig
from nfpi.data import (
    BatchAugment,
    DatasetInfo,
    dequantization_offset,
    dequantize,
    epoch_seed,
    load_dataset,
    to_uint8,
)
from nfpi.data.load import NO_FLIP
from nfpi.data.sharding import (
    EpochShardSampler,
    IndexedDataset,
    ShardSampler,
    per_sample_uniform,
)
from nfpi.errors import CheckpointError, ConfigError, NonFiniteLossError
from nfpi.flows import FlowModel, build_flow
from nfpi.prior import ClassStatistics, GaussianPrior, PriorService, PriorUpdate, pairwise_kl

__all__ = [
    "CHECKPOINT_FILE",
    "EpochResult",
    "PriorClient",
    "TrainedModel",
    "Trainer",
    "collect_statistics",
    "evaluate",
    "load_trained",
]

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "state.pt"
_PHASE_TRAIN, _PHASE_STATS = 0, 1


class PriorClient(Protocol):
    """Who solves the prior: :class:`~nfpi.prior.PriorService` or a remote wrapper of it."""

    def initialize(self, stats: ClassStatistics) -> PriorUpdate: ...

    def update(self, stats: ClassStatistics) -> PriorUpdate: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class EpochResult:
    """Handed to every callback at the end of an epoch, on every rank.

    ``checkpoint_dir`` (rank 0 only) holds the checkpoint just written; ``artifacts`` the PNGs
    written this epoch.
    """

    epoch: int
    metrics: dict[str, float]
    checkpoint_dir: Path | None = None
    artifacts: list[Path] = field(default_factory=list)
    prior_report: dict[str, Any] | None = None


Callback = Callable[["Trainer", EpochResult], None]


# --------------------------------------------------------------------------------- utilities
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "'cpu' or 'auto': no CUDA device is visible")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    return torch.device(name)


def _seed_phase(seed: int, epoch: int, phase: int) -> torch.Generator:
    """Seed every global RNG from (seed, epoch, phase) and return a CPU generator for the
    augmentation: the randomness of an epoch is then the same whether the run got there directly
    or resumed."""
    s = epoch_seed(seed, 2 * epoch + phase)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
    return torch.Generator().manual_seed(s)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_reduce(t: Tensor) -> Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t


def _nll_nats(flow: nn.Module, prior: GaussianPrior, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample discrete NLL in nats (continuous NLL + d log 128) and the latents."""
    z, logdet = flow(x)
    nll = -(prior.log_prob(z, y) + logdet) + dequantization_offset(z.shape[1])
    return nll, z


def _keyed_inputs(
    x: Tensor, index: Tensor, seed: int, augment: BatchAugment | None, device: torch.device
) -> Tensor:
    """Dequantised (and augmented) images whose randomness is keyed by sample index: the same
    image gets the same noise however the data is sharded or batched."""
    extra = BatchAugment.NUM_UNIFORMS if augment is not None else 0
    u = per_sample_uniform(seed, index, extra + x[0].numel()).to(device)
    x = x.to(device)
    if augment is not None:
        x = augment(x, uniforms=u[:, :extra])
    return dequantize(x, noise=u[:, extra:].reshape(x.shape))


@torch.no_grad()
def collect_statistics(
    flow: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor, Tensor]],
    num_classes: int,
    device: torch.device,
    *,
    seed: int,
    shift: Tensor | None = None,
    full: bool = False,
    augment: BatchAugment | None = None,
) -> ClassStatistics:
    """Class statistics of ``flow``'s latents over ``loader`` (``(x, y, index)`` batches of this
    rank's shard), summed over all ranks.

    The dequantisation noise and augmentation (the release computes the statistics under
    training augmentation) are drawn per sample from ``(seed, index)``, so the all-reduced
    statistics of a data-parallel pass equal those of a single process. ``shift`` ([K, d],
    identical on every rank: e.g. the current prior means) keeps the float64 sums free of
    cancellation and the buffers all-reducible.
    """
    stats: ClassStatistics | None = None
    for x, y, index in loader:
        z, _ = flow(_keyed_inputs(x, index, seed, augment, device))
        if stats is None:
            stats = ClassStatistics.empty(
                num_classes, z.shape[1], shift=shift, full=full, device=device
            )
        stats.update_(z, y.to(device))
    if stats is None:
        raise ConfigError("data", "empty", "a non-empty dataset shard for the statistics pass")
    if _world()[1] > 1:
        stats = stats.with_flat(_all_reduce(stats.flat()))
    return stats


@torch.no_grad()
def evaluate(
    flow: nn.Module,
    prior: GaussianPrior,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    seed: int,
) -> dict[str, float]:
    """Test bits/dim and NF-Acc (argmax_y log N(z; mu_y, Sigma_y), one [B, d] x [d, K] product per
    batch) over ``loader``, summed over ranks. Dequantisation noise is seeded: every evaluation
    of a run sees the same noise."""
    gen = torch.Generator(device=device).manual_seed(seed)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll sum, correct, count
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        nll, z = _nll_nats(flow, prior, dequantize(x, gen), y)
        totals += torch.stack(
            [
                nll.double().sum(),
                (prior.classify(z) == y).double().sum(),
                torch.tensor(float(len(y)), device=device),
            ]
        )
    _all_reduce(totals)
    n = float(totals[2])
    return {
        "test_bpd": float(totals[0]) / n / (prior.dim * math.log(2)),
        "nf_acc": float(totals[1]) / n,
    }


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    """One experiment. ``Trainer(config).fit()`` trains, evaluates, checkpoints and plots.

    Args:
        config: the experiment.
        prior_client: who solves the prior (default: an in-process PriorService). Only rank 0
            calls it.
        callbacks: called as ``callback(trainer, EpochResult)`` at every epoch end, on all ranks.
        device: overrides ``config.device`` (e.g. the device Ray Train assigns).
        resume_from: a checkpoint directory or file to resume from; default: the run's own
            ``output_dir/checkpoint`` if it exists.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        *,
        prior_client: PriorClient | None = None,
        callbacks: Iterable[Callback] = (),
        device: torch.device | str | None = None,
        resume_from: str | Path | None = None,
    ) -> None:
        self.config = config
        self.rank, self.world = _world()
        self.device = torch.device(device) if device is not None else _resolve_device(config.device)
        self.callbacks = list(callbacks)
        self.out = Path(config.output_dir).expanduser().resolve()
        self.ckpt_dir = self.out / "checkpoint"
        self.resume_from = Path(resume_from) if resume_from is not None else None
        c = config
        if c.optim.batch_size % self.world:
            raise ConfigError(
                "optim.batch_size",
                c.optim.batch_size,
                f"a multiple of the number of workers ({self.world})",
            )
        self.batch = c.optim.batch_size // self.world

        # Data: the training set (augmented) feeds training and the statistics passes, as in the
        # release; the test set is never augmented.
        kwargs = c.data.dataset_kwargs()
        self.train_set, self.info = load_dataset(
            c.data.name, "train", items_per_class=c.data.items_per_class, seed=c.seed, **kwargs
        )
        self.test_set, _ = load_dataset(
            c.data.name, "test", items_per_class=c.data.test_items_per_class, seed=c.seed, **kwargs
        )
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

        # Model: every rank builds the same flow (seeded) and data-initialises it on the same batch.
        self.flow: FlowModel = build_flow(
            c.flow.preset, in_shape=tuple(self.info.shape), seed=c.seed, **c.flow.overrides()
        ).to(self.device)
        self.prior = GaussianPrior.standard(self.num_classes, self.dim, c.prior.covariance).to(
            self.device
        )
        self.client: PriorClient = prior_client or PriorService(
            c.prior.method,
            self.num_classes,
            self.dim,
            fpi=c.prior.fpi,
            gd=c.prior.gd,
            covariance=c.prior.covariance,
        )
        self.optimizer = torch.optim.Adamax(self.flow.parameters(), lr=c.optim.lr)
        warm = max(c.optim.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm)
        )
        self.ema = EMA(
            self.flow,
            beta=c.ema.beta,
            power=c.ema.power,
            update_every=c.ema.update_every,
            update_after_step=c.ema.update_after_step,
            include_online_model=False,
        )
        self.model: nn.Module = self.flow
        self.epoch, self.step, self.ema_active = 0, 0, c.prior.method != "fpi"
        self.history: list[dict[str, float]] = []
        self.last_report: dict[str, Any] | None = None
        self.prior_version = 0

        self.train_sampler = EpochShardSampler(
            len(self.train_set), seed=c.seed, rank=self.rank, world=self.world
        )
        loader_kw = {"num_workers": c.data.num_workers, "pin_memory": self.device.type == "cuda"}
        self.train_loader = DataLoader(
            self.train_set, self.batch, sampler=self.train_sampler, drop_last=True, **loader_kw
        )
        shard = lambda ds: ShardSampler(len(ds), rank=self.rank, world=self.world)
        self.stats_loader = DataLoader(
            IndexedDataset(self.train_set),
            c.eval.batch_size,
            sampler=shard(self.train_set),
            **loader_kw,
        )
        self.test_loader = DataLoader(
            self.test_set, c.eval.batch_size, sampler=shard(self.test_set), **loader_kw
        )

    # ------------------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _info(self, msg: str, *args: Any) -> None:
        if self.is_main:
            log.info(msg, *args)

    def eval_flow(self) -> nn.Module:
        """The EMA flow once the EMA runs, the online flow before."""
        return self.ema.ema_model if self.ema_active else self.flow

    def _set_prior(self, update: PriorUpdate) -> None:
        self.prior.copy_(update.build().to(self.device))
        self.prior_version, self.last_report = update.version, update.report

    def _broadcast_update(self, update: PriorUpdate | None) -> PriorUpdate:
        if self.world > 1:
            box = [update]
            dist.broadcast_object_list(box, src=0)
            update = box[0]
        assert update is not None
        return update

    def _augmenter(self, gen: torch.Generator) -> Callable[[Tensor], Tensor] | None:
        augment = self.augment
        return None if augment is None else (lambda x: augment(x, gen))

    def _statistics(self, flow: nn.Module, epoch: int) -> ClassStatistics:
        was_training = flow.training
        flow.eval()
        try:
            return collect_statistics(
                flow,
                self.stats_loader,
                self.num_classes,
                self.device,
                seed=epoch_seed(self.config.seed, 2 * epoch + _PHASE_STATS),
                shift=self.prior.means,
                full=self.config.prior.covariance == "full",
                augment=self.augment,
            )
        finally:
            flow.train(was_training)

    # -------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "ema_active": self.ema_active,
            "flow": self.flow.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "prior": self.prior.state_dict(),
            "prior_service": self.client.state_dict(),
            "prior_version": self.prior_version,
            "history": self.history,
            "data_info": dataclasses.asdict(self.info),
            "rng": _rng_state(),
        }

    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoint/state.pt`` atomically (rank 0); returns the directory."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        _atomic_save(self.state_dict(), self.ckpt_dir / CHECKPOINT_FILE)
        (self.ckpt_dir / "config.json").write_text(
            json.dumps(self.config.to_dict(), indent=2, default=str)
        )
        return self.ckpt_dir

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        file = path / CHECKPOINT_FILE if path.is_dir() else path
        if not file.exists():
            raise CheckpointError(f"no checkpoint at {file}")
        try:
            state = torch.load(file, map_location=self.device, weights_only=False)
        except Exception as err:
            raise CheckpointError(f"cannot read checkpoint {file}: {err}") from err
        saved = ExperimentConfig.from_dict(state["config"])
        mine = self.config
        # A resumed run may extend training or change where it writes; nothing else.
        comparable = lambda c: {
            k: v for k, v in c.flat().items() if k not in ("optim.epochs", "output_dir")
        }
        diff = {
            k: (v, comparable(mine).get(k))
            for k, v in comparable(saved).items()
            if comparable(mine).get(k) != v
        }
        if diff:
            raise CheckpointError(
                f"checkpoint {file} was written by a different config: {diff} (saved, now); "
                "use a fresh output_dir or the same config"
            )
        self.flow.load_state_dict(state["flow"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.prior.copy_(GaussianPrior.from_state_dict(state["prior"]).to(self.device))
        if self.is_main:  # only rank 0 talks to the prior client (it may be a remote actor)
            self.client.load_state_dict(state["prior_service"])
        self.epoch, self.step, self.ema_active = state["epoch"], state["step"], state["ema_active"]
        self.prior_version = state["prior_version"]
        self.history = list(state["history"])
        _set_rng_state(state["rng"])
        self._info("resumed from %s at epoch %d (step %d)", file, self.epoch, self.step)

    def _find_resume(self) -> Path | None:
        if self.resume_from is not None:
            return self.resume_from
        return self.ckpt_dir if (self.ckpt_dir / CHECKPOINT_FILE).exists() else None

    # ------------------------------------------------------------------------------- phases
    def _start(self) -> None:
        """Fresh run: data-init of the flow (same batch on every rank) and of the prior."""
        c = self.config
        gen = torch.Generator().manual_seed(c.seed)
        idx = torch.randperm(len(self.train_set), generator=gen)[: min(512, len(self.train_set))]
        batch = torch.stack([self.train_set[int(i)][0] for i in idx])
        seed = epoch_seed(c.seed, _PHASE_STATS)
        self.flow.data_init(_keyed_inputs(batch, idx, seed, self.augment, self.device))
        stats = self._statistics(self.flow, epoch=0)
        update = self.client.initialize(stats) if self.is_main else None
        self._set_prior(self._broadcast_update(update))
        self._info(
            "prior data-init (v%d) from %d samples", self.prior_version, int(stats.count.sum())
        )
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.flow, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        c = self.config
        augment = self._augmenter(_seed_phase(c.seed, epoch, _PHASE_TRAIN))
        self.train_sampler.set_epoch(epoch)
        self.model.train()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch}",
            leave=False,
            disable=not (self.is_main and sys.stderr.isatty()),
        )
        for x, y in bar:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            x = dequantize(augment(x) if augment is not None else x)
            nll, _ = _nll_nats(self.model, self.prior, x, y)
            loss = nll.mean() / (self.dim * math.log(2))  # bits/dim
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch}, step {self.step}; the last good "
                    f"checkpoint in {self.ckpt_dir} is intact. Lower optim.lr or set optim.grad_clip"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.optim.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.flow.parameters(), c.optim.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            if self.ema_active:
                self.ema.update()
            totals += torch.stack(
                [loss.detach().double() * len(y), torch.tensor(float(len(y)), device=self.device)]
            )
            bar.set_postfix(bpd=f"{loss.item():.3f}")
        _all_reduce(totals)
        return {"train_bpd": float(totals[0] / totals[1]), "lr": self.scheduler.get_last_lr()[0]}

    def _prior_update(self, epoch: int) -> tuple[dict[str, float], list[Path]]:
        before = self.prior.clone()
        t0 = time.perf_counter()
        stats = self._statistics(self.flow, epoch)  # includes the all-reduce
        t1 = time.perf_counter()
        update = self.client.update(stats) if self.is_main else None
        self._set_prior(self._broadcast_update(update))
        timing = {"prior_stats_s": t1 - t0, "prior_refresh_s": time.perf_counter() - t1}
        report: dict[str, Any] = self.last_report or {}
        metrics: dict[str, float] = {**timing, "prior_version": float(report.get("version", 0))}
        if report.get("kind") == "fpi":
            metrics.update(
                fpi_iterations=float(report["iterations"]),
                fpi_residual=float(report["residuals"][-1])
                if report["residuals"]
                else float("nan"),
                fpi_converged=float(report["converged"]),
            )
            if not self.ema_active:
                # The EMA starts from the online weights that produced the solved prior.
                self.ema_active = True
                self.ema.step.zero_()
                self.ema.initted.fill_(False)
                self.ema.update()  # copies the online weights now, so evaluation sees them
        elif report.get("kind") == "gd":
            metrics.update(gd_merit=float(report["merit_after"]), gd_steps=float(report["steps"]))
        artifacts: list[Path] = []
        if self.is_main and self.config.eval.plots:
            v = int(report.get("version", 0))
            names = self.info.class_names
            kl_before = pairwise_kl(before.means, before.scale_param)
            kl_after = pairwise_kl(self.prior.means, self.prior.scale_param)
            artifacts.append(
                plots.kl_heatmaps(
                    kl_before, kl_after, names, self.out / "plots" / f"kl_heatmap_v{v}.png"
                )
            )
            if report.get("kind") == "fpi" and report.get("residuals"):
                artifacts.append(
                    plots.residual_curve(
                        report["residuals"],
                        self.out / "plots" / f"fpi_residual_v{v}.png",
                        title=f"FPI residual ({report.get('stop_reason', '')}, {report['iterations']} it.)",
                    )
                )
        return metrics, artifacts

    def _prior_metrics(self) -> dict[str, float]:
        kl = pairwise_kl(self.prior.means, self.prior.scale_param)
        k = kl.shape[0]
        if k < 2:
            return {}
        off = kl[~torch.eye(k, dtype=torch.bool, device=kl.device)]
        return {"kl_min": float(off.min()), "kl_mean": float(off.mean())}

    @torch.no_grad()
    def _pictures(self, tag: str) -> list[Path]:
        """Sample grids at each temperature and the t-SNE of test latents (rank 0)."""
        c, flow, out = self.config, self.eval_flow(), self.out / "plots"
        flow.eval()
        gen = torch.Generator(device=self.prior.means.device).manual_seed(c.seed)
        n = c.eval.samples_per_class
        labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(n)
        paths = []
        for t in c.eval.temperatures:
            z = self.prior.sample(labels, temperature=t, generator=gen).to(self.device)
            x, _ = flow.inverse(z)
            paths.append(
                plots.sample_grid(
                    to_uint8(x), self.info.class_names, t, out / f"samples_T{t:g}{tag}.png"
                )
            )
        if c.eval.tsne_points > 0:
            zs, ys, seen = [], [], 0
            for x, y in self.test_loader:
                z, _ = flow(dequantize(x.to(self.device)))
                zs.append(z.cpu())
                ys.append(y)
                seen += len(y)
                if seen >= c.eval.tsne_points:
                    break
            z, y = torch.cat(zs)[: c.eval.tsne_points], torch.cat(ys)[: c.eval.tsne_points]
            paths.append(
                plots.tsne_plot(
                    z, y, self.prior.means, self.info.class_names, out / f"tsne{tag}.png", c.seed
                )
            )
        return paths

    # ---------------------------------------------------------------------------------- fit
    def fit(self) -> list[dict[str, float]]:
        """Train to ``optim.epochs`` (resuming if a checkpoint exists); returns the per-epoch
        metrics history."""
        c = self.config
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(c.to_dict(), indent=2, default=str))
        resume = self._find_resume()
        if resume is not None:
            self.load_checkpoint(resume)
            if self.world > 1:
                self.model = nn.parallel.DistributedDataParallel(
                    self.flow,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None,
                )
        else:
            self._start()
        for epoch in range(self.epoch, c.optim.epochs):
            t0 = time.perf_counter()
            metrics: dict[str, float] = {"epoch": float(epoch)}
            metrics.update(self._train_epoch(epoch))
            artifacts: list[Path] = []
            report = None
            if c.prior.solves_after(epoch):
                prior_metrics, artifacts = self._prior_update(epoch)
                metrics.update(prior_metrics)
                report = self.last_report
            metrics["prior_version"] = float(self.prior_version)
            metrics.update(self._prior_metrics())
            last = epoch == c.optim.epochs - 1
            if (epoch + 1) % c.eval.every == 0 or last:
                metrics.update(
                    evaluate(self.eval_flow(), self.prior, self.test_loader, self.device, c.seed)
                )
            if (
                self.is_main
                and c.eval.plots
                and (last or (c.eval.plot_every and (epoch + 1) % c.eval.plot_every == 0))
            ):
                artifacts += self._pictures("" if last else f"_epoch{epoch}")
            metrics["epoch_seconds"] = time.perf_counter() - t0
            self.epoch = epoch + 1
            self.history.append(metrics)
            ckpt = None
            if self.is_main:
                ckpt = self.save_checkpoint()
                with open(self.out / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(metrics) + "\n")
            if self.world > 1:
                dist.barrier()
            self._info(
                "epoch %d: %s",
                epoch,
                ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"),
            )
            result = EpochResult(epoch, metrics, ckpt, artifacts, report)
            for callback in self.callbacks:
                callback(self, result)
        return self.history


@dataclass
class TrainedModel:
    """A trained flow and its prior, read back from a checkpoint by :func:`load_trained`."""

    flow: FlowModel
    prior: GaussianPrior
    config: ExperimentConfig
    info: DatasetInfo
    epoch: int
    path: Path | None = None  # the checkpoint file it was read from


def load_trained(
    path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True
) -> TrainedModel:
    """The (EMA) flow and the prior of a checkpoint (a run's ``checkpoint`` dir or its state.pt),
    in eval mode, for generation, evaluation or augmentation. ``use_ema`` falls back to the online
    weights when the EMA had not started yet."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(
            f"no checkpoint at {file}: pass a run's checkpoint directory or its {CHECKPOINT_FILE}"
        )
    state = torch.load(file, map_location="cpu", weights_only=False)
    config = ExperimentConfig.from_dict(state["config"])
    info = DatasetInfo(**state["data_info"])
    flow = build_flow(
        config.flow.preset, in_shape=tuple(info.shape), seed=config.seed, **config.flow.overrides()
    )
    weights = state["flow"]
    if use_ema and state["ema_active"]:
        prefix = "ema_model."
        weights = {k[len(prefix) :]: v for k, v in state["ema"].items() if k.startswith(prefix)}
    flow.load_state_dict(weights)
    prior = GaussianPrior.from_state_dict(state["prior"])
    return TrainedModel(
        flow.to(device).eval(), prior.to(device), config, info, int(state["epoch"]), file.resolve()
    )
