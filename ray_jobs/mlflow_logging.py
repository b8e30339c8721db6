"""What a run leaves in MLflow besides its params, metrics and pictures: the datasets it read
(``mlflow.log_input``), its final flow and prior as a loadable model, and, for a sweep's parent
run, what compares the trials (results table as markdown and CSV, a plot of every trial's
curves, the best value per group as metrics).

The model is an MLflow ``pyfunc`` "model from code" (:mod:`ray_jobs.pyfunc_flow`) carrying a
slim checkpoint (the EMA flow's weights and the prior, no optimiser state) and the ``nfpi``
package itself, so ``mlflow.pyfunc.load_model(...)`` classifies images and samples classes in
any environment with the listed requirements; with a model name it is registered in the
tracking store's model registry.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException

import nfpi
from nfpi import plots
from nfpi.checkpoint import load_checkpoint
from nfpi.config import ExperimentConfig
from ray_jobs.tracking import RunLogger, Tracking

__all__ = [
    "MODEL_NAME",
    "VIEW_TAG_PREFIX",
    "ensure_registered_model",
    "log_datasets",
    "log_flow_model",
    "log_sweep_summary",
    "metric_key",
    "model_alias",
    "save_sweep_view",
]

log = logging.getLogger("nfpi.mlflow")

MODEL_NAME = "model"  # the artifact folder (and logged-model name) of a run's flow
PYFUNC_CODE = Path(__file__).with_name("pyfunc_flow.py")
# What loading the model imports (nfpi.checkpoint and its imports), pinned to this environment.
MODEL_REQUIREMENTS = (
    "torch",
    "torchvision",
    "numpy",
    "scikit-learn",
    "ema-pytorch",
    "matplotlib",
    "tqdm",
    "mlflow",
)


def metric_key(text: str) -> str:
    """``gd / linear`` -> ``gd_linear``: a group's name as part of an MLflow metric key."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "all"


# ------------------------------------------------------------------------------------ datasets
def _dataset(config: ExperimentConfig, split: str, size: int | None, shape: Any, k: int) -> Dataset:
    data = config.data
    if data.root is not None:
        source_type, source = "local", {"uri": str(Path(data.root).expanduser().resolve())}
    else:
        origin = {"digits": "sklearn.datasets.load_digits"}.get(data.name, f"nfpi.data:{data.name}")
        source_type, source = "code", {"tags": {"mlflow.source.name": origin}}
    selection = {
        "name": data.name,
        "split": split,
        "items_per_class": data.items_per_class if split == "train" else data.test_items_per_class,
        "image_size": data.image_size,
        **source,
    }
    digest = hashlib.sha1(json.dumps(selection, sort_keys=True).encode()).hexdigest()[:8]
    profile = {"num_rows": size, "num_classes": k, "image_shape": list(shape)}
    return Dataset(
        name=f"{data.name}-{split}",
        digest=digest,
        source_type=source_type,
        source=json.dumps(source),
        profile=json.dumps({k: v for k, v in profile.items() if v is not None}),
    )


_DATASET_ATTEMPTS = 3  # log_datasets: tries of one dataset log under concurrent trials


def log_datasets(
    tracking: Tracking,
    run_id: str,
    config: ExperimentConfig,
    *,
    shape: Any,
    num_classes: int,
    train_size: int | None,
    test_size: int | None,
) -> None:
    """The run's training and test sets as dataset inputs (contexts ``training`` and
    ``testing``); a re-launched run does not log them twice.

    A sweep's trials start together and log the same dataset into one experiment. MLflow looks
    for the dataset, then inserts it, so of two trials doing that at once one fails on the
    store's uniqueness constraint; that trial tries again and finds the other's dataset.
    """
    client = tracking.client()
    for attempt in range(1, _DATASET_ATTEMPTS + 1):
        have = {d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs}
        inputs = [
            DatasetInput(
                _dataset(config, split, size, shape, num_classes),
                tags=[InputTag("mlflow.data.context", context)],
            )
            for split, size, context in (
                ("train", train_size, "training"),
                ("test", test_size, "testing"),
            )
            if f"{config.data.name}-{split}" not in have
        ]
        if not inputs:
            return
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as error:
            if attempt == _DATASET_ATTEMPTS or not _is_conflict(error):
                raise


def _is_conflict(error: MlflowException) -> bool:
    """A uniqueness violation, as SQLite, PostgreSQL and MySQL word it through SQLAlchemy."""
    text = str(error).lower()
    return "unique constraint" in text or "duplicate" in text or "integrityerror" in text


# --------------------------------------------------------------------------------------- model
def _slim_checkpoint(checkpoint: str | Path, out: Path) -> Path:
    """The parts of a checkpoint that :func:`nfpi.checkpoint.load_trained` reads (the EMA
    flow's weights as the flow, the prior, the config, the data info), as ``out/state.pt``."""
    state = load_checkpoint(checkpoint)
    flow = state["flow"]
    if state.get("ema") is not None:
        prefix = "ema_model."
        flow = {k[len(prefix) :]: v for k, v in state["ema"].items() if k.startswith(prefix)}
    slim = {
        "config": state["config"],
        "epoch": state["epoch"],
        "flow": flow,
        "ema": None,
        "prior": state["prior"],
        "data_info": state["data_info"],
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(slim, out / "state.pt")
    return out / "state.pt"


def _requirements() -> list[str]:
    out = []
    for name in MODEL_REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


@contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``log_model`` logs to the active run) pointed at ``uri`` for the
    block only: ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, which would
    otherwise redirect every later run of this process (and its children) to this store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _input_example(state_file: Path, n: int = 4) -> Any:
    """``n`` images shaped and typed like the training data (uint8 [N, C, H, W], a fixed
    pattern: no dataset is read), the model's input example; MLflow infers the signature from
    it and the model's prediction on it."""
    info = torch.load(state_file, map_location="cpu", weights_only=True)["data_info"]
    c, h, w = info["shape"]
    return (torch.arange(n * c * h * w) * 37 % 256).to(torch.uint8).reshape(n, c, h, w).numpy()


def model_alias(label: str) -> str:
    """A trial's label as a registered-model alias (``fpi lam=300`` -> ``fpi-lam-300``: letters,
    digits, ``_`` and ``-`` only, as MLflow requires)."""
    alias = re.sub(r"[^A-Za-z0-9_-]+", "-", label).strip("-").lower() or "run"
    return f"run-{alias}" if re.fullmatch(r"v\d+|latest", alias) else alias  # reserved names


def ensure_registered_model(tracking: Tracking, name: str, description: str) -> None:
    """Create the registered model ``name`` unless it exists (once, in the driver: the trials
    of a sweep then only add versions; their concurrent first creation would race)."""
    client = tracking.client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description=f"nfpi sweep {description}; one version per trial"
        )


def log_flow_model(
    tracking: Tracking,
    run_id: str,
    checkpoint: str | Path,
    registered_model: str | None = None,
    alias: str | None = None,
) -> str:
    """Log the checkpoint's flow and prior as the run's MLflow model (``runs:/<run>/model``):
    the run's final epoch (the checkpoint's, with that epoch's metrics linked to the logged
    model), a signature and an input example (images -> classes). Registered as
    ``registered_model`` when given, the version aliased ``alias`` (:func:`model_alias`: e.g.
    ``models:/nfpi-digits@fpi``) and described by its epoch and metrics; returns the model's
    URI."""
    # No download progress bars on the console (log_model reads its artifacts back).
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    state = load_checkpoint(checkpoint)
    # The MLflow step of the checkpoint's last epoch (the "epoch" metric: 0-based); the
    # checkpoint's "epoch" counts the epochs done.
    history = state.get("history") or []
    epoch = int(history[-1]["epoch"]) if history else max(int(state["epoch"]) - 1, 0)
    with _fluent_tracking_uri(tracking.uri), tempfile.TemporaryDirectory() as tmp:
        slim = _slim_checkpoint(checkpoint, Path(tmp) / "checkpoint")
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # MLflow asks for type hints on predict(): ours takes images or a sampling request,
            # which one hint cannot describe (and a hint makes MLflow convert the input). Its
            # warning is raised under MLflow's own "once" filter, which overrides an "ignore"
            # filter here: it is dropped where it is shown instead.
            show = warnings.showwarning

            def _show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
                if "type hint" not in str(message).lower():
                    show(message, category, *args, **kwargs)

            warnings.showwarning = _show  # restored by catch_warnings
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(PYFUNC_CODE),
                artifacts={"checkpoint": str(slim)},
                code_paths=[str(Path(nfpi.__file__).parent)],
                pip_requirements=_requirements(),
                registered_model_name=registered_model,
                # (images, {"seed": 0}): the signature's input and its params (the noise seed).
                input_example=(_input_example(slim), {"seed": 0}),
                # The metrics MLflow links to the logged model are those logged at this step:
                # the final epoch's (its default, step 0, linked the first epoch's).
                step=epoch,
            )
    if registered_model is not None and info.registered_model_version is not None:
        client = tracking.client()
        version = str(info.registered_model_version)
        metrics = client.get_run(run_id).data.metrics
        shown = ", ".join(
            f"{k} {metrics[k]:.4f}" for k in ("nf_acc", "test_bpd", "train_bpd") if k in metrics
        )
        client.update_model_version(
            registered_model,
            version,
            description=f"the EMA flow and prior of run {run_id} after its final epoch "
            f"(epoch {epoch}, counted from 0)" + (f"; {shown}" if shown else ""),
        )
        client.set_model_version_tag(registered_model, version, "epoch", str(epoch))
        if alias:
            client.set_registered_model_alias(registered_model, model_alias(alias), version)
    return info.model_uri


# ---------------------------------------------------------------------------------- the sweep
def log_sweep_summary(
    parent: RunLogger,
    *,
    title: str,
    table: str,
    rows: list[dict[str, Any]],
    curves: dict[str, list[dict[str, float]]],
    metric: str,
    mode: str,
) -> None:
    """On the sweep's parent run: ``results.md`` (the table), ``results.csv`` (one row per
    trial), ``comparison.png`` (every trial's NF-Acc and test bits/dim per epoch), and the best
    ``metric`` per group (``best_<metric>.<group>``) and overall (``best_<metric>``)."""
    parent.text(f"# {title}\n\n{table}\n", "results.md")
    keys = sorted({k for r in rows for k, v in r["metrics"].items() if isinstance(v, (int, float))})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial", "group", "status", *keys])
    for r in rows:
        writer.writerow(
            [r["label"], r["group"], r["status"], *[r["metrics"].get(k, "") for k in keys]]
        )
    parent.text(buf.getvalue(), "results.csv")
    with tempfile.TemporaryDirectory() as tmp:
        if any(curves.values()):
            png = plots.comparison_curves(curves, Path(tmp) / "comparison.png", title=title)
            parent.artifact(png)
    best: dict[str, float] = {}
    for r in rows:
        value = r["metrics"].get(metric)
        if not isinstance(value, (int, float)):
            continue
        for key in (f"best_{metric}", f"best_{metric}.{metric_key(r['group'])}"):
            old = best.get(key)
            if old is None or (value > old if mode == "max" else value < old):
                best[key] = float(value)
    parent.metrics(best, step=0)


# ------------------------------------------------------------------------ the sweep's runs view
# MLflow 3's UI keeps saved and shared views of the runs table as experiment tags with this
# prefix (a JSON envelope whose ``state`` is the table's state); a link with
# ``viewStateShareKey=<key>`` opens one, and the UI's "Views" menu lists them.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
# The runs table's state the UI expects (its defaults, mlflow/server/js experiment-page state).
_VIEW_DEFAULTS: dict[str, Any] = {
    "columnOrder": [],
    "columnWidths": {},
    "runsHiddenMode": "FIRST_10_RUNS",
    "viewMaximized": False,
    "runListHidden": False,
    "isAccordionReordered": False,
    "useGroupedValuesInCharts": True,
    "hideEmptyCharts": True,
    "groupsExpanded": {},
    "autoRefreshEnabled": True,
    "globalLineChartConfig": {
        "xAxisKey": "step",
        "lineSmoothness": 0,
        "selectedXAxisMetricKey": "",
    },
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
    "startTime": "ALL",
    "lifecycleFilter": "Active",
    "modelVersionFilter": "All Runs",
    "datasetsFilter": [],
}


def save_sweep_view(
    tracking: Tracking,
    *,
    sweep: str,
    parent_run_id: str,
    group_by: str,
    params: list[str],
    metrics: list[str],
    sort_by: str | None = None,
    ascending: bool = False,
) -> str:
    """A saved view of the runs table showing a sweep's trials (the parent run's children),
    grouped by the param ``group_by`` (e.g. the prior method; the UI shows a sweep's child runs
    folded under their parent otherwise), with ``params`` and ``metrics`` as columns, sorted by
    the metric ``sort_by`` (default: the first of ``metrics``; best first). Returns its key, for
    :func:`ray_jobs.tracking.ui_url`.

    Not sorted by start time: with that order MLflow 3.17's UI also fetches the parent run of
    the trials it shows (to nest them), and the parent, which has no ``group_by`` param, showed
    as an extra group "Additional runs (1)" in the view."""
    key = f"nfpi-{metric_key(sweep)}-{parent_run_id[:8]}"
    sort_by = sort_by or (metrics[0] if metrics else None)
    order = {"orderByKey": f"metrics.`{sort_by}`", "orderByAsc": ascending} if sort_by else {}
    state = {
        **_VIEW_DEFAULTS,
        **order,
        "selectedColumns": [
            *(f"params.`{p}`" for p in params),
            *(f"metrics.`{m}`" for m in metrics),
            "attributes.`Models`",
        ],
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "groupBy": {
            "aggregateFunction": "max",
            "groupByKeys": [{"mode": "param", "groupByData": group_by}],
        },
    }
    now = int(time.time() * 1000)
    envelope = {
        "name": f"sweep {sweep} ({parent_run_id[:8]})",
        "createdAt": now,
        "updatedAt": now,
        "state": json.dumps(state),
    }
    tracking.client().set_experiment_tag(
        tracking.experiment_id(), VIEW_TAG_PREFIX + key, json.dumps(envelope)
    )
    return key
