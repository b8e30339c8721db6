"""A Ray Tune sweep over a named search space; each trial is a Ray Train run.

    python ray_jobs/sweep.py                          # embedded default: digits, data-init/GD/FPI
    python ray_jobs/sweep.py --space smoke            # 2 trials, ~2.5 min on 2 cores (CI)
    python ray_jobs/sweep.py --space table2 --set data.root=/data/cifar100 --use-gpu
    python ray_jobs/sweep.py --space alpha_pi --num-samples 16 --asha --set data.root=...
    python ray_jobs/sweep.py --space table2 --resume  # continue an interrupted sweep

With no arguments it starts a local Ray, writes an MLflow SQLite store under ./results, trains on
the bundled digits on CPU and prints a results table (per method: best config, NF-Acc, test
bits/dim). Under ``ray job submit`` it attaches to that cluster and, with no ``--results-dir``,
writes to ``$NFPI_RESULTS`` or ``~/nfpi-results`` (a job's working directory is a temporary copy
that vanishes with the Ray session); the first log lines name the folder and the ``mlflow ui``
command that opens it.

Train V2 inside Tune: the trial is a plain function that starts a TorchTrainer (with
``TuneReportCallback`` forwarding rank 0's reports), owns the trial's prior actor, and logs to a
child MLflow run of the sweep's parent run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from filelock import FileLock
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.sample import Domain
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nfpi.config import ExperimentConfig
from nfpi.entry import Parser, run_cli, setup_logging
from nfpi.errors import ConfigError
from nfpi.plan import H100_EFFECTIVE_FLOPS, format_plans
from nfpi.presets import EXPERIMENTS, parse_override
from ray_jobs.augment_pool import build_pool, train_set_of
from ray_jobs.mlflow_logging import (
    ensure_registered_model,
    log_sweep_summary,
    metric_key,
    save_sweep_view,
)
from ray_jobs.progress import SweepProgress
from ray_jobs.resources import (
    ClusterConcurrency,
    TrialFootprint,
    alive_node_resources,
    release_capacity,
    request_capacity,
    trials_that_fit,
)
from ray_jobs.settings import (
    RaySettings,
    add_common_args,
    check_before_ray,
    connect,
    describe_outputs,
    untrusted_pickles,
)
from ray_jobs.tracking import UI, RunLogger, param_value, start_run, ui_command, ui_url
from ray_jobs.train import final_metrics, run_experiment
from search_spaces import SPACE_NAMES, SearchSpace, Trial, load_space

__all__ = ["SweepSpec", "flow_digest", "main", "results_table", "run_trial"]

log = logging.getLogger("nfpi.sweep")


@dataclass(frozen=True)
class SweepSpec:
    """What every trial of a sweep shares: the space, the sweep's name, the command line's
    overrides, the cluster settings and the parent MLflow run; ``repeats`` (Tune's
    ``num_samples``) > 1 numbers the trials' labels."""

    space: str
    sweep: str
    overrides: dict[str, Any]
    settings: RaySettings
    parent_run_id: str | None = None
    repeats: int = 1

    def trial(self, sample: dict[str, Any]) -> tuple[SearchSpace, Trial]:
        """The space (for the chosen options) and the trial of ``sample``: the one builder
        (:meth:`search_spaces.SearchSpace.trial`) every user of a trial's config goes through."""
        space, _ = load_space(self.space).with_options(self.overrides)
        return space, space.trial(sample, self.overrides)

    def label(self, trial: Trial, trial_id: str) -> str:
        """A trial's name in the console and in MLflow: what it varies (``fpi lam=300``),
        numbered (``#3``, Tune's trial index) when the sweep repeats its samples."""
        label = trial.label
        return f"{label} #{int(trial_id.rsplit('_', 1)[-1])}" if self.repeats > 1 else label


def run_trial(tune_config: dict[str, Any], spec: SweepSpec) -> dict[str, float]:
    """One Tune trial: the space's flow config for this sample as a Ray Train run (reporting
    every epoch to Tune), or, for a downstream space, that flow (trained once per distinct
    config and shared) followed by its downstream evaluation."""
    space, trial = spec.trial(tune_config)
    trial_id = tune.get_context().get_trial_id()
    run_name = f"{spec.sweep}-{trial_id}"
    label = spec.label(trial, trial_id)
    config = trial.config
    if space.kind == "flow":
        result = run_experiment(
            config,
            spec.settings,
            run_name,
            parent_run_id=spec.parent_run_id,
            storage=spec.settings.storage / spec.sweep / "train",
            train_callbacks=[TuneReportCallback()],
            display_name=label,
        )
        return final_metrics(result)
    return _downstream_trial(trial, run_name, spec, label)


def flow_digest(config: ExperimentConfig) -> str:
    """A name for a flow config (its name aside): trials and sweeps that train the same flow
    share one Ray Train run under ``ray/flows/flow-<digest>``."""
    values = {k: v for k, v in config.flat().items() if k != "name"}
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _downstream_trial(
    trial: Trial, run_name: str, spec: SweepSpec, label: str | None = None
) -> dict[str, float]:
    settings = spec.settings
    config, down = trial.config, trial.downstream
    tracking = settings.tracking
    run_id = None
    if tracking is not None:
        # A resumed trial keeps its run.
        run_id = start_run(
            tracking,
            run_name,
            parent_run_id=spec.parent_run_id,
            resume=True,
            display_name=label,
        )
        RunLogger(tracking, run_id).params(
            {f"downstream.{k}": v for k, v in down.to_dict().items()}
        )
    flow_name = f"flow-{flow_digest(config)}"
    flows = settings.storage / "flows"
    flows.mkdir(parents=True, exist_ok=True)
    # One trainer per flow config at a time; a finished flow re-launched under its name resumes
    # at its end and returns at once.
    with FileLock(str(flows / f"{flow_name}.lock")):
        flow = run_experiment(config, settings, flow_name, mlflow_run_id=run_id, storage=flows)
    metrics = {
        k: v
        for k, v in final_metrics(flow).items()
        if k in ("nf_acc", "test_bpd", "train_bpd", "epoch")
    }
    if down.nf_pool is not None and down.classifier.nf_augment is not None:
        # NF augmentation from a pool: its rounds are built here by parallel Ray tasks (once
        # per flow and settings: concurrent trials wait for the same build, later ones reuse
        # it); the downstream task then only reads them.
        flow_dir = settings.run_dir(flow_name)
        aug = down.classifier.nf_augment
        pool = build_pool(flow_dir, train_set_of(flow_dir), aug, down.nf_pool,
                          down.classifier.epochs, num_cpus=settings.cpus_per_worker,
                          use_gpu=settings.use_gpu, escape_placement_group=True)  # fmt: skip
        metrics["nf_pool_build_s"] = pool.seconds
    resources = {
        "num_cpus": settings.cpus_per_worker,
        "num_gpus": 1 if settings.use_gpu else 0,
    }
    # Outside the trial's (token-sized) placement group: the task holds a worker's resources.
    escape = PlacementGroupSchedulingStrategy(placement_group=None)
    task = ray.remote(**resources)(_run_downstream_task).options(scheduling_strategy=escape)
    out_dir = settings.run_dir(run_name) / "downstream"
    metrics.update(
        ray.get(task.remote(str(settings.run_dir(flow_name)), down, str(out_dir), settings, run_id))
    )
    if tracking is not None:
        RunLogger(tracking, run_id).finish()
    tune.report(metrics)
    return metrics


def _run_downstream_task(
    flow_run_dir: str, down: Any, out_dir: str, settings: RaySettings, run_id: str | None
) -> dict[str, float]:
    """The downstream evaluation on a Ray worker: per-epoch classifier metrics and the PNGs go
    to the trial's MLflow run."""
    import torch

    from nfpi.downstream import run_downstream

    tracking = settings.tracking
    logger = RunLogger(tracking, run_id) if tracking is not None and run_id is not None else None

    def log_epoch(role: str, epoch: int, m: dict[str, float]) -> None:
        if logger is not None:
            logger.metrics({f"{role}_{k}": v for k, v in m.items() if k != "epoch"}, step=epoch)

    device = torch.device("cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu")
    result = run_downstream(flow_run_dir, down, out_dir, device=device, callback=log_epoch)
    if logger is not None:
        logger.metrics(result.metrics, step=0)
        for path in result.artifacts:
            logger.artifact(path, "downstream")
        manifest = Path(out_dir) / "generated" / "manifest.json"
        if manifest.exists():
            logger.artifact(manifest, "downstream/generated")
    return result.metrics


def group_of(space: SearchSpace, row: dict[str, Any]) -> tuple:
    """The results-table row a trial belongs to: its values of the space's ``group_by`` keys."""
    overrides = space.overrides_of(row["config"])
    return tuple(_lookup(overrides, row["full_config"], k) for k in space.group_by)


def _raise_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM (``ray job stop``, a scheduler's kill) raise SystemExit in the main thread,
    so that ``finally`` blocks run; returns what restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def results_table(space: SearchSpace, rows: list[dict[str, Any]]) -> str:
    """Per group (e.g. method): the best trial (its label, or its sampled config) and its
    metrics."""
    groups: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = group_of(space, row)
        score = row["metrics"].get(space.metric, math.nan)
        best = groups.get(key)
        better = (
            best is None
            or ((score > best["score"]) if space.mode == "max" else (score < best["score"]))
            or math.isnan(best["score"])
        )
        if better and not math.isnan(score) or key not in groups:
            groups[key] = {"score": score, **row}
    head = " / ".join(space.group_by)
    # Downstream columns appear when some trial has them (CNN-Acc next to NF-Acc, as Table 2).
    extra = [
        (k, t)
        for k, t in (
            ("cnn_acc", "CNN-Acc"),
            ("real_acc", "real-data acc"),
            ("aug_acc", "classifier acc"),
        )
        if any(k in r["metrics"] for r in rows)
    ]
    cols = [
        "objective",
        "best trial",
        "NF-Acc",
        *[t for _, t in extra],
        "test bits/dim",
        "epochs",
        "status",
    ]
    lines = [f"| {head} | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]
    for key, row in sorted(groups.items(), key=lambda kv: str(kv[0])):
        m = row["metrics"]
        cfg = row.get("label") or json.dumps(space.overrides_of(row["config"]), default=str)
        cells = [
            _objective_cell(row["full_config"]),
            f"`{cfg}`",
            _fmt(m.get("nf_acc")),
            *[_fmt(m.get(k)) for k, _ in extra],
            _fmt(m.get("test_bpd")),
            _fmt(m.get("epoch"), 0, plus=1),
            row["status"],
        ]
        lines.append(f"| {' / '.join(str(k) for k in key)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _objective_cell(full: dict[str, Any]) -> str:
    """What the row's prior solver minimised (every row says it: FPI and GD compare at equal
    objective unless ``prior.gd_objective`` says otherwise); ``-`` for data-init."""
    if not full:
        return "-"
    prior = ExperimentConfig.from_dict(full).prior
    if prior.method == "data-init":
        return "- (no solve)"
    o = prior.objective_for()
    return f"lambda={o.lam:g}, alpha={o.alpha:g}, pi={o.pi}"


def _lookup(overrides: dict[str, Any], full: dict[str, Any], key: str) -> Any:
    if key in overrides:
        return overrides[key]
    node: Any = full
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return "-"
        node = node[part]
    return node


def _fmt(value: Any, digits: int = 4, plus: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value) + plus:.{digits}f}"


def _label_of(spec: SweepSpec, trial_config: dict[str, Any], trial_id: str) -> str:
    return spec.label(spec.trial(trial_config)[1], trial_id)


def _epochs_of(spec: SweepSpec, trial_config: dict[str, Any]) -> int:
    return spec.trial(trial_config)[1].config.optim.epochs


def _curves(res: Any) -> list[dict[str, float]]:
    """A trial's per-epoch metrics as Tune recorded them (empty for a downstream trial's single
    report)."""
    frame = getattr(res, "metrics_dataframe", None)
    if frame is None or "epoch" not in frame:
        return []
    return [
        {k: float(v) for k, v in rec.items() if isinstance(v, (int, float))}
        for rec in frame.to_dict("records")
    ]


# Tune logs a failed trial's full traceback and a list of failed trials here; SweepProgress
# writes each failure as one line with the path of its error file instead.
TUNE_ERROR_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.tune")


def _drop_trial_failures(record: logging.LogRecord) -> bool:
    text = str(record.msg)
    return not text.startswith(("Trial task failed", "Trials did not complete"))


# The metrics the sweep's saved runs view shows as columns (those the trials have).
VIEW_METRICS = ("nf_acc", "test_bpd", "train_bpd", "cnn_acc", "real_acc", "aug_acc", "aug_top5")


def _varied_params(rows: list[dict[str, Any]], space: SearchSpace) -> list[str]:
    """The config keys whose values differ between the sweep's trials (its group keys first)."""
    flats = [ExperimentConfig.from_dict(r["full_config"]).flat() for r in rows if r["full_config"]]
    keys = ["prior.method"] + [k for k in space.group_by if flats and k in flats[0]]
    keys = list(dict.fromkeys(keys))
    for key in flats[0] if flats else ():
        values = {json.dumps(f.get(key), default=str) for f in flats}
        if len(values) > 1 and key not in keys:
            keys.append(key)
    return keys


def _trial_id(res: Any) -> str:
    """A Tune result's trial id (``d2b87_00002``), from its metrics or its folder's name."""
    found = (res.metrics or {}).get("trial_id")
    if found:
        return str(found)
    match = re.search(r"([0-9a-f]{5}_\d{5})", Path(str(res.path or "")).name)
    return match.group(1) if match else "x_0"


def _epilog() -> str:
    return (
        "spaces: "
        + ", ".join(SPACE_NAMES)
        + "\nexperiments (the spaces' bases): "
        + ", ".join(EXPERIMENTS)
        + "\nevery config key: python -m nfpi config --keys"
    )


def print_plan(
    space: SearchSpace,
    overrides: dict[str, Any],
    num_samples: int | None,
    out: str | None,
    tflops: float,
) -> int:
    """``--plan``: one row per trial of ``space`` (each built by the trial's own builder, so a
    row shows the config its trial runs), printed as a table, and written to ``out`` as JSON
    records (:data:`nfpi.plan.PLAN_FIELDS`). Starts no Ray."""
    notes = []
    given = dict(overrides)
    # A plan needs neither the data nor weights files: paths a run requires are planned with a
    # stand-in, and the plan says the run will need them.
    for _ in range(1 + len(space.required)):
        try:
            trials = space.trials(given, n_random=1)
            break
        except ConfigError as err:
            if err.value is not None or err.field not in ("data.root", *space.required):
                raise
            notes.append(f"{err.field} is not set; the run needs --set {err.field}=/abs/path")
            given[err.field] = f"/{err.field}-not-set"
    else:
        trials = space.trials(given, n_random=1)
    plans = [t.plan(tflops) for t in trials]
    distinct = list(range(len(trials)))
    if space.kind == "downstream":  # trials of one flow config train it once (flow_digest)
        first = {flow_digest(t.config): i for i, t in reversed(list(enumerate(trials)))}
        distinct = sorted(first.values())
        notes.append(
            "the classifiers' cost (CNN-Acc, augmentation runs) is not included; each distinct "
            "flow is trained once and shared"
        )
    repeats = num_samples or space.num_samples
    if repeats > 1:
        notes.append(f"each row runs {repeats} times (--num-samples): multiply the cost by that")
    if any(isinstance(v, Domain) for v in space.params.values()):
        notes.append("values drawn at random by Tune are shown for one draw")
    print(f"{space.name}: {space.reproduces}\n\n{format_plans(plans, tflops, distinct)}")
    for note in notes:
        print(f"Note: {note}.")
    if out:
        path = Path(out).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([p.record() for p in plans], indent=1) + "\n")
        print(f"Plan records: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0], epilog=_epilog())
    parser.add_argument(
        "--space",
        default="digits",
        choices=SPACE_NAMES,
        help="a search space; table spaces take options, e.g. --set variant=paper",
    )
    parser.add_argument("--name", help="sweep name (default: the space's name)")
    parser.add_argument("--num-samples", type=int, help="Tune samples (default: the space's)")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        help="at most this many trials at once (default: as many as fit the cluster, "
        "recomputed as it scales)",
    )
    parser.add_argument(
        "--asha", action="store_true", help="early-stop weak trials (ASHA on the metric)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="resume an interrupted sweep of this name"
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print what every trial will run (schedule, GD learning rates, EMA, objective, "
        "training images, flow size, estimated H100-hours) and exit without starting Ray",
    )
    parser.add_argument(
        "--out", metavar="PATH", help="with --plan: also write the rows as a JSON list of records"
    )
    parser.add_argument(
        "--plan-tflops",
        type=float,
        default=H100_EFFECTIVE_FLOPS / 1e12,
        metavar="T",
        help="with --plan: sustained TFLOP/s of one GPU for the cost (default: an assumption, "
        "see nfpi/plan.py; measure with benchmarks/gpu_rows.sh)",
    )
    parser.add_argument(
        "--no-register-model",
        action="store_true",
        help="do not register the trials' final models (default: in the registry as "
        "nfpi-<sweep name>, one version per trial, aliased by its label: models:/nfpi-digits@fpi)",
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    if args.smoke_test:
        args.space = "smoke"
    overrides = dict(parse_override(s) for s in args.set)
    # Option keys (--set variant=paper, dataset=...) select the space's grid; trials re-select it.
    space, _ = load_space(args.space).with_options(overrides)
    sweep = args.name or space.name
    if args.plan or args.out:
        return print_plan(space, overrides, args.num_samples, args.out, args.plan_tflops)
    configs = space.validate(overrides)  # fail fast, naming the bad field, before any trial runs
    if args.num_workers < 1:
        parser.error(
            "--num-workers must be >= 1 in a sweep (Train's local mode cannot run in a Tune trial)"
        )
    if args.max_concurrent is not None and args.max_concurrent < 1:
        parser.error("--max-concurrent must be >= 1")
    if args.num_samples is not None and args.num_samples < 1:
        parser.error(
            f"--num-samples must be >= 1 (got {args.num_samples}; leave it out for the space's {space.num_samples})"
        )
    settings = RaySettings.from_args(args)
    if settings.registered_model is None and not args.no_register_model:
        settings = dataclasses.replace(settings, registered_model=f"nfpi-{metric_key(sweep)}")
    for line in describe_outputs(settings):
        log.info(line)
    if settings.registered_model is not None and settings.tracking is not None:
        ensure_registered_model(
            settings.tracking, settings.registered_model, f"{space.name}: {space.reproduces}"
        )
    footprint = TrialFootprint.of(settings)
    # Cheap checks before Ray starts (data paths, batch vs workers, this machine's resources).
    for warning in check_before_ray(configs, settings, args.address):
        log.warning(warning)
    tracking = settings.tracking
    assert tracking is not None
    parent_file = settings.storage / sweep / "mlflow_parent_run_id"
    resumed = args.resume and parent_file.exists()
    if resumed:  # the sweep's parent run and its params are the first launch's
        parent_id = parent_file.read_text().strip()
        client = tracking.client()
        first = client.get_run(parent_id).data.params.get("overrides")
        if first is not None and first != param_value(overrides):
            raise ConfigError(
                "--set",
                param_value(overrides),
                f"the first launch's overrides {first} to resume sweep {sweep!r} (its trials "
                "must not change config halfway); start a new sweep with --name to change them",
            )
        client.update_run(parent_id, status="RUNNING")
        parent = RunLogger(tracking, parent_id)
    else:
        parent_id = start_run(tracking, sweep, tags={"nfpi.sweep": sweep, "nfpi.space": space.name})
        parent_file.parent.mkdir(parents=True, exist_ok=True)
        parent_file.write_text(parent_id)
        parent = RunLogger(tracking, parent_id)
        parent.params(
            {
                "space": space.name,
                "reproduces": space.reproduces,
                "overrides": overrides,
                "num_workers": settings.num_workers,
                "use_gpu": settings.use_gpu,
            }
        )

    restore_sigterm = _raise_on_sigterm()
    try:
        return _run_sweep(
            args, space, sweep, overrides, configs, settings, parent_id, parent, footprint
        )
    except BaseException as err:  # the parent run ends FAILED or KILLED, never RUNNING forever
        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
        parent.finish("KILLED" if interrupted else "FAILED")
        raise
    finally:
        restore_sigterm()


def _run_sweep(
    args: argparse.Namespace,
    space: SearchSpace,
    sweep: str,
    overrides: dict[str, Any],
    configs: list[ExperimentConfig],
    settings: RaySettings,
    parent_id: str,
    parent: RunLogger,
    footprint: TrialFootprint,
) -> int:
    tracking = settings.tracking
    assert tracking is not None
    log.info(connect(args.address, verbose=args.verbose))
    repeats = args.num_samples or space.num_samples
    spec = SweepSpec(space.name, sweep, overrides, settings, parent_id, repeats)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec),
        tune.PlacementGroupFactory([dict(footprint.driver)]),
    )
    limiter = ClusterConcurrency(footprint, cap=args.max_concurrent)
    trials = repeats * math.prod(
        len(v["grid_search"])
        for v in space.params.values()
        if isinstance(v, dict) and "grid_search" in v
    )
    fits = trials_that_fit(alive_node_resources(), footprint)
    log.info(
        "%s: %s; %d trial(s), each %s; %d at once on this cluster now",
        sweep,
        space.reproduces,
        trials,
        footprint.describe(),
        max(1, min(fits, args.max_concurrent or fits)),
    )
    progress = SweepProgress(
        label=functools.partial(_label_of, spec), epochs=functools.partial(_epochs_of, spec)
    )
    if not args.verbose:
        # Tune's new output engine prints its header even when silent; the legacy one at
        # verbosity 0 prints nothing (SweepProgress speaks instead, a failed trial included).
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        for name in TUNE_ERROR_LOGGERS:
            logging.getLogger(name).addFilter(_drop_trial_failures)
    asked = request_capacity(footprint, trials)  # an autoscaling cluster adds nodes up front
    storage = settings.storage
    try:
        if args.resume and tune.Tuner.can_restore(str(storage / sweep)):
            untrusted = untrusted_pickles(storage / sweep)  # Tuner.restore unpickles: runs code
            if untrusted is not None:
                raise ConfigError(
                    "--resume", str(storage / sweep),
                    f"Tune state only this user can have written ({untrusted}); restoring it "
                    "would unpickle it, which can run code: fix its ownership or permissions "
                    "(e.g. chmod -R go-w) if you trust it, or start the sweep under a new name",
                )  # fmt: skip
            tuner = tune.Tuner.restore(
                str(storage / sweep),
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=True,
            )
        else:
            if args.resume:
                log.warning(
                    "sweep %r died before Tune saved its state: starting it afresh under the "
                    "same name and parent run %s",
                    sweep,
                    parent_id,
                )
            scheduler = None
            if args.asha:
                scheduler = ASHAScheduler(
                    time_attr="training_iteration",
                    grace_period=max(1, configs[0].optim.epochs // 8),
                    max_t=max(c.optim.epochs for c in configs),
                )
            tuner = tune.Tuner(
                trainable,
                param_space=space.param_space(),
                tune_config=tune.TuneConfig(
                    metric=space.metric,
                    mode=space.mode,
                    num_samples=repeats,
                    search_alg=limiter,
                    scheduler=scheduler,
                ),
                run_config=tune.RunConfig(
                    name=sweep,
                    storage_path=str(storage),
                    verbose=None if args.verbose else 0,
                    callbacks=[] if args.verbose else [progress],
                ),
            )
        grid = tuner.fit()
    finally:
        if asked:
            release_capacity()

    rows, failed, curves = [], 0, {}
    for res in grid:
        status = "error" if res.error else "ok"
        failed += res.error is not None
        config = res.config or {}
        trial = spec.trial(config)[1] if config else None
        full = trial.config.to_dict() if trial is not None else {}
        label = spec.label(trial, _trial_id(res)) if trial is not None else "-"
        row = {
            "config": config,
            "full_config": full,
            "metrics": dict(res.metrics or {}),
            "status": status,
            "label": label,
        }
        row["group"] = " / ".join(str(k) for k in group_of(space, row))
        rows.append(row)
        curves[label] = _curves(res)
    table = results_table(space, rows)
    print(f"\n{space.name}: {space.reproduces}\n\n{table}\n")
    experiment_id = tracking.experiment_id()
    varied = _varied_params(rows, space)
    view = save_sweep_view(
        tracking,
        sweep=sweep,
        parent_run_id=parent_id,
        group_by=varied[0] if varied else "prior.method",
        params=varied,
        metrics=[k for k in VIEW_METRICS if any(k in r["metrics"] for r in rows)],
        sort_by=space.metric if any(space.metric in r["metrics"] for r in rows) else None,
        ascending=space.mode == "min",
    )
    print(
        f"MLflow: {ui_command(tracking.uri)}\n"
        f"  the trials: {ui_url(experiment_id, view=view)}\n"
        f"  the comparison: {ui_url(experiment_id, parent_id)}"
        + (
            f"\n  the models: {UI}/#/models/{settings.registered_model} (one version per trial)"
            if settings.registered_model
            else ""
        )
    )
    log_sweep_summary(
        parent,
        title=f"{space.name}: {space.reproduces}",
        table=table,
        rows=rows,
        curves=curves,
        metric=space.metric,
        mode=space.mode,
    )
    parent.finish("FAILED" if failed else "FINISHED")
    if failed:
        print(
            f"{failed} of {len(rows)} trials failed; their errors are above and in {storage / sweep}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    from ray_jobs.sweep import main as _main  # run as the module, so trials import it by name

    sys.exit(run_cli(_main, prog="ray_jobs/sweep.py"))
