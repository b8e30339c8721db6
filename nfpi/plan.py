"""What a run will do, before it runs: its schedule, its prior's settings and its cost.

:func:`plan_of` turns a (resolved) experiment config into a :class:`RunPlan`: the epochs after
which the prior is solved, the GD steps and learning rates it takes, the EMA it keeps, the
objective (the paper's lambda and the release's unnormalised value), the training images, the
flow's size and an estimate of its cost on one H100. ``ray_jobs/sweep.py --plan`` prints one per
trial; the trial then runs exactly the config its row was made from (:mod:`search_spaces`).

The cost estimate
-----------------
FLOPs: :func:`flow_cost` counts one forward pass per image with
:class:`torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix products; elementwise
work is not counted). A training step costs 3 forward passes (forward + backward); each solve
adds one forward pass over the training set (its statistics), each evaluation one over the test
set. Throughput: :data:`H100_EFFECTIVE_FLOPS`, an assumed 15 TFLOP/s sustained on one H100. It is
not a measurement (no GPU was lent to the task that wrote this): the flows are many small
convolutions and per-pixel matrix exponentials, far from the card's 495 TFLOP/s dense TF32 peak,
and 10-20 TFLOP/s is the range ``benchmarks/REPRODUCTION.md`` has used since issue 13. Measure it
with ``benchmarks/gpu_rows.sh`` and pass the result (``--plan-tflops``) to replace it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.utils.flop_counter
from torch.nn.attention import SDPBackend, sdpa_kernel

from nfpi.checks import train_set_size
from nfpi.config import ExperimentConfig

__all__ = [
    "H100_EFFECTIVE_FLOPS",
    "PLAN_FIELDS",
    "RunPlan",
    "flow_cost",
    "format_plans",
    "input_shape",
    "plan_of",
]

log = logging.getLogger("nfpi.plan")

H100_EFFECTIVE_FLOPS = 15e12  # assumed, see the module docstring
THROUGHPUT_BASIS = (
    "assumed {tflops:g} TFLOP/s sustained on one H100 (not measured: see nfpi/plan.py; measure "
    "with benchmarks/gpu_rows.sh and pass --plan-tflops)"
)
# Image shapes (C, H, W), classes and test images of the datasets a config names.
_DATASETS: dict[str, tuple[tuple[int, int, int], int, int]] = {
    "digits": ((1, 8, 8), 10, 360),
    "cifar10": ((3, 32, 32), 10, 10_000),
    "cifar100": ((3, 32, 32), 100, 10_000),
}
# One forward pass per image (FLOPs) and parameters of the shipped flows at the shapes their
# presets use, counted once with flow_cost's method (tests/test_plan.py recounts the small ones;
# the mef-cifar row is checked by a slow test). Other flows are counted when first asked for.
_KNOWN_COST: dict[str, tuple[float, int]] = {
    '["mef-cifar", [3, 32, 32], {}]': (12_259_952_960.0, 42_815_440),
    '["mef-cifar-attn", [3, 32, 32], {}]': (12_870_066_176.0, 55_208_944),
}

PLAN_FIELDS: tuple[str, ...] = (
    "trial",
    "dataset",
    "method",
    "policy",
    "epochs",
    "solve_epochs",
    "gd_steps",
    "lr_start",
    "lr_mid",
    "lr_end",
    "lr_min",
    "ema_update_every",
    "ema_update_after_step",
    "lam",
    "lam_released",
    "alpha",
    "pi",
    "train_images",
    "flow_params",
    "gflop_per_image",
    "gpu_hours",
)


@dataclass(frozen=True)
class RunPlan:
    """One run's plan (a ``--plan`` row). GD fields are ``None`` unless the method is ``gd``;
    EMA fields are ``None`` without an EMA; ``lam_released`` is lambda x K (K - 1) (the
    release's unnormalised weight); ``train_images`` and ``gpu_hours`` are ``None`` when the
    training set's size is not known without reading it (image folders)."""

    trial: str
    dataset: str
    method: str
    policy: str | None
    epochs: int
    solve_epochs: list[int]
    gd_steps: int | None
    lr_start: float | None
    lr_mid: float | None
    lr_end: float | None
    lr_min: float | None
    ema_update_every: int | None
    ema_update_after_step: int | None
    lam: float | None
    lam_released: float | None
    alpha: float | None
    pi: str | None
    train_images: int | None
    flow_params: int
    gflop_per_image: float
    gpu_hours: float | None

    def record(self) -> dict[str, Any]:
        """The flat record ``--plan --out`` writes (keys: :data:`PLAN_FIELDS`)."""
        return asdict(self)


def input_shape(config: ExperimentConfig) -> tuple[int, int, int]:
    """The (C, H, W) the flow of ``config`` sees, without reading the data."""
    data = config.data
    if data.name in _DATASETS:
        return _DATASETS[data.name][0]
    if data.name == "synthetic":
        return tuple(data.shape or (3, 16, 16))  # type: ignore[return-value]
    size = data.image_size or 32
    return (3, size, size)


def _classes_and_test(config: ExperimentConfig) -> tuple[int | None, int | None]:
    data = config.data
    if data.name in _DATASETS:
        _, k, test = _DATASETS[data.name]
        per_class = data.test_items_per_class
        return k, test if per_class is None else min(test, k * per_class)
    if data.name == "synthetic":
        k = data.num_classes or 10
        return k, k * (data.test_items_per_class or 16)
    return None, None


@functools.lru_cache(maxsize=32)
def _count(key: str) -> tuple[float, int]:
    from nfpi.flows import build_flow  # local: building flows is not needed to read a config

    preset, shape, overrides = json.loads(key)
    log.info("counting the FLOPs of flow %s at %s (once per flow)", preset, shape)
    flow = build_flow(preset, in_shape=tuple(shape), **overrides)
    params = sum(p.numel() for p in flow.parameters())
    x = torch.zeros(2, *shape)
    # The math backend of scaled_dot_product_attention: the fused CPU kernels are not counted.
    with (
        torch.no_grad(),
        sdpa_kernel(SDPBackend.MATH),
        torch.utils.flop_counter.FlopCounterMode(display=False) as counter,
    ):
        flow(x)
    return counter.get_total_flops() / 2, params


def flow_cost(config: ExperimentConfig) -> tuple[float, int]:
    """(FLOPs of one forward pass per image, parameters) of the flow of ``config``."""
    key = json.dumps(
        [config.flow.preset, list(input_shape(config)), config.flow.overrides()],
        default=list,
    )
    return _KNOWN_COST.get(key) or _count(key)


def plan_of(
    config: ExperimentConfig, trial: str = "", tflops: float = H100_EFFECTIVE_FLOPS / 1e12
) -> RunPlan:
    """The plan of one run of ``config`` (resolved first: what runs is what the plan shows);
    ``tflops`` is the sustained throughput assumed for the cost."""
    config = config.resolved()
    prior, optim, ema = config.prior, config.optim, config.ema
    epochs = optim.epochs
    solves = prior.solve_epochs(epochs)
    gd = prior.method == "gd"
    gd_steps = prior.gd_steps(epochs) if gd else None
    policy = prior.gd.policy if gd else None
    lrs: list[float | None] = [None, None, None]
    if policy is not None and gd_steps:
        lrs = [policy.lr(0), policy.lr((gd_steps - 1) // 2), policy.lr(gd_steps - 1)]
    k, test_images = _classes_and_test(config)
    objective = prior.objective_for() if prior.method != "data-init" else None
    train_images = train_set_size(config)
    flops, params = flow_cost(config)
    hours = None
    if train_images is not None:
        evals = sum(1 for e in range(epochs) if (e + 1) % config.eval.every == 0 or e == epochs - 1)
        passes = 3 * epochs * train_images + (len(solves) + 1) * train_images
        passes += evals * (test_images or 0)
        hours = passes * flops / (tflops * 1e12) / 3600
    return RunPlan(
        trial=trial or config.name,
        dataset=config.data.name,
        method=prior.method,
        policy=policy.name if policy is not None else None,
        epochs=epochs,
        solve_epochs=solves,
        gd_steps=gd_steps,
        lr_start=lrs[0],
        lr_mid=lrs[1],
        lr_end=lrs[2],
        lr_min=policy.lr_min if policy is not None else None,
        ema_update_every=ema.update_every if ema.enabled else None,
        ema_update_after_step=ema.update_after_step if ema.enabled else None,
        lam=objective.lam if objective is not None else None,
        lam_released=(
            objective.lam * k * (k - 1) if objective is not None and k is not None else None
        ),
        alpha=objective.alpha if objective is not None else None,
        pi=objective.pi if objective is not None else None,
        train_images=train_images,
        flow_params=params,
        gflop_per_image=flops / 1e9,
        gpu_hours=hours,
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        if len(value) > 6:
            return f"{value[0]}..{value[-1]} ({len(value)})"
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 1e7:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


_COLUMNS = (
    ("trial", "trial"),
    ("dataset", "dataset"),
    ("method", "method"),
    ("policy", "GD policy"),
    ("epochs", "epochs"),
    ("solve_epochs", "solves after epoch"),
    ("gd_steps", "GD steps"),
    ("lr_start", "lr first"),
    ("lr_mid", "lr mid"),
    ("lr_end", "lr last"),
    ("lr_min", "lr_min"),
    ("ema_update_every", "EMA every"),
    ("ema_update_after_step", "EMA after"),
    ("lam", "lambda"),
    ("lam_released", "lambda released"),
    ("alpha", "alpha"),
    ("pi", "pi"),
    ("train_images", "train images"),
    ("flow_params", "flow params"),
    ("gflop_per_image", "GFLOP/img"),
    ("gpu_hours", "H100 hours"),
)


def format_plans(
    plans: list[RunPlan],
    tflops: float = H100_EFFECTIVE_FLOPS / 1e12,
    distinct: list[int] | None = None,
) -> str:
    """A markdown table of ``plans``, its total cost and the basis of the estimate.
    ``distinct``: the indices of the rows whose runs are distinct (trials that share one flow
    train it once: its cost counts once); default all."""
    lines = [
        "| " + " | ".join(title for _, title in _COLUMNS) + " |",
        "|---" * len(_COLUMNS) + "|",
    ]
    for plan in plans:
        rec = plan.record()
        lines.append("| " + " | ".join(_cell(rec[key]) for key, _ in _COLUMNS) + " |")
    runs = [plans[i] for i in (range(len(plans)) if distinct is None else distinct)]
    hours = [p.gpu_hours for p in runs]
    total = (
        f"{sum(hours):.1f} H100-hours in all"  # type: ignore[arg-type]
        if all(h is not None for h in hours)
        else "cost unknown for rows without a known training-set size"
    )
    shared = f" ({len(plans)} trials share them)" if len(runs) < len(plans) else ""
    basis = THROUGHPUT_BASIS.format(tflops=tflops)
    return "\n".join(lines) + (f"\n\n{len(runs)} flow run(s){shared}, {total}; throughput {basis}.")
