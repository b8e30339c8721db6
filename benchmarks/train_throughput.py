"""Training throughput against the machine's dense-convolution peak, and the matrix exponential.

Usage::

    python benchmarks/train_throughput.py --quick              # ~1-2 minutes on 2 CPU cores
    python benchmarks/train_throughput.py --out bench.json     # full: mef-cifar, batch 64
    python benchmarks/train_throughput.py --profile            # + where a step's time goes
    python benchmarks/train_throughput.py --device cuda        # the same rows on a GPU
    python benchmarks/train_throughput.py --smoke-test         # seconds: tiny preset, batch 2

Every training row runs in a fresh worker process that measures, in this order and in the same
minute: the **dense-convolution peak** at the model's own convolution shapes (every distinct
(C_in, C_out, k, H, W) of the model at the row's batch, forward + backward, channels-last, the
best rate of any shape: ``peak_gflops``; the FLOP-weighted rate of the model's mix:
``conv_mix_gflops``), then the training steps, then the peak again (the larger of the two counts).
A step = forward, class-conditional diagonal-gaussian NLL, backward, Adamax step, on random
dequantised images. ``expm`` says which matrix exponential the MEF layers use:

- ``project``: :func:`nfpi.flows.expm` (Paterson-Stockmeyer Taylor, Fréchet-derivative backward);
- ``taylor_host_sync``: the released MEF code's loop (a Taylor series that reads the norm of the
  next term back to the host after every term, differentiated by autograd): the
  release-equivalent row, same architecture and layers otherwise.

Fields: ``images_per_s`` (batch / fastest step; the machine is shared), ``images_per_s_median``,
``gflop_per_image`` (forward + backward, ``torch.utils.flop_counter`` on the model: convolutions
and matrix products), ``achieved_gflops`` (= images/s x GFLOP/image), ``flop_utilization``
(achieved / ``peak_gflops``), ``peak_mb`` (CPU: the worker's peak resident set, ``VmHWM``, torch
runtime included; CUDA: ``torch.cuda.max_memory_allocated``), ``forward_s``/``backward_s``/
``optimizer_s`` (median phases), ``cpu_s_per_step``, ``loadavg_1min``.

Matrix-exponential rows (``bench = matrix_exp``): ``torch.linalg.matrix_exp``, the project's
``expm`` and the released Taylor loop on the coupling's per-pixel batches at c = 6, 12, 24 (the
three levels of mef-cifar), forward and forward + backward, with the error against a float64
``matrix_exp``; the printed ratio is ``torch.linalg.matrix_exp`` time over ``expm`` time.

``--profile`` adds one profiled step of the first model (``project``) and prints where its time
goes: conv-norm convolutions forward / backward, other convolutions, matrix exponential, ELU,
optimizer, everything else; then the top operators by self time.

``--compile`` adds a ``project`` row with ``torch.compile(flow, dynamic=False)`` (compile time
excluded; the row also gives the compiled step's bits/dim and log-determinants against the eager
flow's on one batch, float32; tests/flows/test_compile.py checks them in float64);
``--compile-only`` runs that row alone (``benchmarks/gpu_rows.sh`` gives it its own time limit).

``--invertible-backward`` adds a row whose flow rebuilds activations in backward (its worker
returns freed memory to the OS first, as training on the CPU should: ``nfpi.training.heap``);
``--interleave N`` adds, per model, N rounds of autograd and invertible-backward steps
alternating in one worker (CPU and wall seconds per step, the ratios at the same load);
``--record PATH`` writes ``{commit, command, date, records}`` (a published table's record).
On the CPU, ``peak_mb`` is the training steps' own peak (``VmHWM`` restarted before them).

``--smoke-test``: the ``tiny`` preset at batch 2, one timed step per row, small matrix batches.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import math
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from _common import (  # benchmarks/ is on sys.path
    add_device_arg,
    benchmark_parser,
    check_device,
    device_name,
    device_peak_mb,
    mode_name,
    reset_device_peak,
    run_worker,
    synchronize,
    vm,
    worker_env,
    write_published,
    write_records,
)
from _peer import NAME as PEER_NAME
from _peer import peer_glow

MEF_REFERENCE_PARAMS = 42.9e6
MODELS = ["mef-cifar"]
PEER = PEER_NAME
EXPM = ("project", "taylor_host_sync")


# ------------------------------------------------------------------------------------------------
# The released matrix exponential
# ------------------------------------------------------------------------------------------------


def taylor_host_sync(a: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scaling-and-squaring Taylor series that stops when the largest term's 1-norm drops
    below ``eps``: one ``.item()`` (a host synchronisation on a GPU) per term, like the
    released MEF code's ``expm``; differentiated by autograd."""
    norm = torch.linalg.matrix_norm(a, ord=1).max().item()
    squarings = max(0, math.ceil(math.log2(max(norm, 0.5))) + 1)
    a = a / 2**squarings
    out = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    term, k = a, 2
    while torch.linalg.matrix_norm(term, ord=1).max().item() > eps:
        out = out + term
        term = torch.matmul(a, term) / k
        k += 1
    for _ in range(squarings):
        out = torch.matmul(out, out)
    return out


def use_expm(kind: str) -> None:
    """Make the MEF layers use ``kind``'s matrix exponential (in this worker process only)."""
    if kind == "project":
        return
    import nfpi.flows.conv1x1
    import nfpi.flows.coupling

    nfpi.flows.coupling.expm = taylor_host_sync
    nfpi.flows.conv1x1.expm = taylor_host_sync


# ------------------------------------------------------------------------------------------------
# The dense-convolution peak at the model's shapes
# ------------------------------------------------------------------------------------------------


def model_conv_shapes(forward) -> collections.Counter:
    """Counter of (C_in, C_out, k, H, W) over every convolution of ``forward()``."""
    shapes: collections.Counter = collections.Counter()
    real = F.conv2d

    def counting(x, w, *args, **kwargs):
        shapes[(w.shape[1], w.shape[0], w.shape[2], x.shape[2], x.shape[3])] += 1
        return real(x, w, *args, **kwargs)

    # The layers call torch.nn.functional.conv2d (the module nfpi.flows imports as F).
    try:
        F.conv2d = counting
        with torch.no_grad():
            forward()
    finally:
        F.conv2d = real
    return shapes


def conv_peak(
    shapes: collections.Counter, batch: int, device: str, reps: int
) -> tuple[float, float, list[dict]]:
    """(best GFLOP/s of any shape, FLOP-weighted GFLOP/s of the mix, per-shape rows): dense
    channels-last convolutions, forward + backward (input and weight gradients)."""
    rows, total_flop, total_s = [], 0.0, 0.0
    for (cin, cout, k, h, w), count in sorted(shapes.items()):
        fmt = torch.channels_last
        x = torch.randn(batch, cin, h, w, device=device).contiguous(memory_format=fmt)
        wt = torch.randn(cout, cin, k, k, device=device) / math.sqrt(cin * k * k)
        x.requires_grad_()
        wt = wt.contiguous(memory_format=fmt).requires_grad_()
        g = torch.randn(batch, cout, h, w, device=device).contiguous(memory_format=fmt)
        flop = 3 * 2 * batch * h * w * cin * cout * k * k  # forward + 2 gradient convolutions

        def step(x=x, wt=wt, g=g, pad=k // 2) -> None:
            x.grad = wt.grad = None
            F.conv2d(x, wt, padding=pad).backward(g)

        seconds = _best(step, reps, device)
        rows.append(
            {"shape": f"{cin}->{cout} k{k} {h}x{w}", "count": count, "gflops": flop / seconds / 1e9}
        )
        total_flop += count * flop
        total_s += count * seconds
    return max(r["gflops"] for r in rows), total_flop / total_s / 1e9, rows


# ------------------------------------------------------------------------------------------------
# Training step (runs inside a fresh worker process)
# ------------------------------------------------------------------------------------------------


def _best(fn, reps: int, device: str) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _flop_per_image(flow, loss_fn, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(flow, *batch).backward()
    flow.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch[0])


CATEGORIES = (  # (profiler range name prefix, category); the nearest enclosing range decides
    ("_ScaledConv2dBackward", "conv-norm convolutions, backward"),
    ("_ScaledConv2d", "conv-norm convolutions, forward"),
    # A residual block's conv2 (1x1) + ELU + conv3 (3x3): its backward also recomputes conv2.
    ("_RecomputedMiddleBackward", "conv-norm convolutions, backward"),
    ("_RecomputedMiddle", "conv-norm convolutions, forward"),
    ("_Expm", "matrix exponential (fwd + bwd)"),
    ("_ELUInplace", "ELU (fwd + bwd)"),
    ("aten::elu", "ELU (fwd + bwd)"),
    ("Optimizer.step", "optimizer (Adamax)"),
    ("aten::convolution_backward", "other convolutions (1x1 W, coupling output), bwd"),
    ("aten::mkldnn_convolution", "other convolutions (1x1 W, coupling output), fwd"),
    ("aten::cudnn_convolution", "other convolutions (1x1 W, coupling output), fwd"),
)


def _category(event) -> str:
    """The category of the nearest enclosing range that has one (a conv-norm's convolution
    counts as conv-norm, not as "other convolutions")."""
    found = None
    e = event
    while e is not None:
        for prefix, name in CATEGORIES:
            if e.name.startswith(prefix):
                if not prefix.startswith("aten::") or prefix == "aten::elu":
                    return name  # (ELU's backward inside a recomputed block counts as ELU)
                found = found or name
        e = e.cpu_parent
    return found or "other (actnorm, coupling arithmetic, loss, autograd)"


def _profile(step, device: str) -> dict[str, Any]:
    """Self CPU time (CUDA: device time) of one step, by category and by operator."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
    by_cat: dict[str, float] = collections.defaultdict(float)
    if device == "cpu":
        for e in prof.events():
            by_cat[_category(e)] += e.self_cpu_time_total / 1e6
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda a: getattr(a, attr), reverse=True)
    top = [
        {"op": a.key, "seconds": getattr(a, attr) / 1e6, "calls": a.count}
        for a in ops[:15]
        if getattr(a, attr) > 0
    ]
    return {"categories": dict(by_cat), "top_ops": top}


def _spec_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.hidden is None else {"hidden": args.hidden}


def _train_worker(args: argparse.Namespace) -> dict[str, Any]:
    from nfpi.flows import PRESETS, build_flow
    from nfpi.training.heap import return_freed_memory

    device, batch, model = args.device, args.batch, args.worker
    # As training does with optim.invertible_backward on the CPU (nfpi.training.heap).
    returned = args.invertible_backward and device == "cpu" and return_freed_memory()
    rss_base = vm("VmRSS")
    torch.manual_seed(0)
    in_shape = (3, args.image_size, args.image_size)
    peer = model == PEER
    preset = args.match if peer else model
    flow = build_flow(preset, in_shape=in_shape, **_spec_overrides(args)).to(device)
    n_params = sum(p.numel() for p in flow.parameters())
    d, k = flow.latent_dim, 10
    extra: dict[str, Any] = {"image_size": args.image_size, "hidden": flow.spec.hidden}
    if peer:
        spec = PRESETS[preset].replace(**_spec_overrides(args))
        flow, width, n_peer = peer_glow(n_params, spec, in_shape, k)
        flow = flow.to(device)
        extra.update(hidden=width, matched_model=preset, matched_params=n_params)
        extra["params_with_base"] = sum(p.numel() for p in flow.parameters())
        n_params = n_peer
    # Class gaussians (diagonal), fixed: the flow's training step is what is measured.
    means = torch.randn(k, d, device=device) * 0.1
    log_std = torch.zeros(k, d, device=device)

    def images(n: int = batch) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.randint(0, 256, (n, *in_shape), device=device).float()
        x = (pixels + torch.rand_like(pixels)) / 256 * 2 - 1
        return x, torch.randint(0, k, (n,), device=device)

    def loss_fn(net, x, y):
        if peer:  # normflows' own class-conditional NLL (its base distributions are learned)
            return (net.forward_kld(x, y) + d * math.log(128)) / (d * math.log(2))
        z, logdet = net(x)
        mu, ls = means[y], log_std[y]
        log_p = (-0.5 * ((z - mu) * torch.exp(-ls)) ** 2 - ls).sum(1)
        nll = -(log_p - 0.5 * d * math.log(2 * math.pi) + logdet).mean()
        # bits/dim of the dequantised 8-bit images ([-1, 1] scaling adds d log 128).
        return (nll + d * math.log(128)) / (d * math.log(2))

    init = images(min(batch * 4, 256) if batch > 2 else 8)
    if peer:  # normflows' ActNorm initialises itself on its first forward pass
        with torch.no_grad():
            flow.forward_kld(*init)
    else:
        flow.data_init(init[0])
    # The model's FLOPs, counted on the project's layers (the same model for every row).
    flop_per_image = _flop_per_image(flow, loss_fn, images(2))
    use_expm(args.expm)
    shapes = model_conv_shapes(lambda: loss_fn(flow, *images(2)))
    peak_reps = 1 if args.steps <= 1 else 3
    peak0, mix0, conv_rows = conv_peak(shapes, batch, device, peak_reps)
    if args.invertible_backward:  # after the FLOP count: the model's FLOPs, not the rebuild's
        flow.invertible_backward = True
    net = torch.compile(flow, dynamic=False) if args.compile else flow
    opt = torch.optim.Adamax(flow.parameters(), lr=1e-3)
    reset_device_peak(device)
    rss_before_steps = vm("VmRSS")
    _reset_hwm(device)  # the steps' own peak, not data init's or the conv peak's
    times, cpu_times, phases = [], [], collections.defaultdict(list)
    loss = torch.zeros(())

    def step() -> torch.Tensor:
        x, y = images()
        synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net, x, y)
        synchronize(device)
        t1 = time.perf_counter()
        loss.backward()
        synchronize(device)
        t2 = time.perf_counter()
        opt.step()
        synchronize(device)
        t3 = time.perf_counter()
        phases["forward_s"].append(t1 - t0)
        phases["backward_s"].append(t2 - t1)
        phases["optimizer_s"].append(t3 - t2)
        return loss

    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            phases.clear()
        c0, t0 = time.process_time(), time.perf_counter()
        loss = step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{model}: non-finite loss at step {i}")
    peak_gpu = device_peak_mb(device)
    # The training steps' peak, before the profile, the second conv peak and the checks below.
    peak_train = peak_gpu if peak_gpu is not None else vm("VmHWM")
    if args.invertible_backward:
        extra.update(_invertible_checks(flow, loss_fn, images))
    if args.compile:
        extra.update(_compile_checks(flow, net, loss_fn, images))
    profile = _profile(step, device) if args.profile else None
    peak1, mix1, _ = conv_peak(shapes, batch, device, peak_reps)
    peak, mix = max(peak0, peak1), max(mix0, mix1)
    images_per_s = batch / min(times)
    achieved = images_per_s * flop_per_image / 1e9
    row = {
        "bench": "train_step",
        "model": model,
        "batch": batch,
        "expm": args.expm,
        "compile": bool(args.compile),
        "device": device,
        "images_per_s": round(images_per_s, 3),
        "images_per_s_median": round(batch / statistics.median(times), 3),
        "invertible_backward": bool(args.invertible_backward),
        "peak_mb": round(peak_train),
        "gflop_per_image": round(flop_per_image / 1e9, 3),
        "achieved_gflops": round(achieved, 2),
        "peak_gflops": round(peak, 2),
        "conv_mix_gflops": round(mix, 2),
        "flop_utilization": round(achieved / peak, 3),
        "step_s_all": [round(t, 3) for t in times],
        **{k: round(statistics.median(v), 3) for k, v in phases.items()},
        # CPU seconds (all threads) of the step: with passive OpenMP waits this is close to the
        # work itself, so cpu/threads estimates the step time on an otherwise idle machine.
        "cpu_s_per_step": round(statistics.median(cpu_times), 3),
        "steps": args.steps,
        "rss_base_mb": round(rss_base),
        "rss_before_steps_mb": round(rss_before_steps),
        "params_mb": round(sum(p.numel() * p.element_size() for p in flow.parameters()) / 2**20),
        "optimizer_state_mb": round(
            sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values())
            / 2**20
        ),
        "freed_memory_returned": bool(returned),
        "params": n_params,
        "threads": torch.get_num_threads(),
        "bits_per_dim_last": round(loss.item(), 4),
        "loadavg_1min": os.getloadavg()[0],
        "conv_shapes": [[r["shape"], r["count"], round(r["gflops"], 1)] for r in conv_rows],
        **extra,
    }
    if profile is not None:
        row["profile"] = profile
    return row


def _speedup(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Row ``a``'s images/s over row ``b``'s: best steps, and medians in brackets."""
    best = a["images_per_s"] / b["images_per_s"]
    return f"{best:.2f}x (median {a['images_per_s_median'] / b['images_per_s_median']:.2f}x)"


def _compile_checks(flow, net, loss_fn, images) -> dict[str, float]:
    """The compiled flow against the eager one on one batch: largest bits/dim and
    log-determinant differences (float32: round-off of a reordered sum is expected)."""
    x, y = images()
    with torch.no_grad():
        eager, compiled = flow(x), net(x)  # one pass each: the loss reuses its (z, logdet)
        bpd_eager = loss_fn(lambda _: eager, x, y)
        bpd_compiled = loss_fn(lambda _: compiled, x, y)
    ld_eager, ld_compiled = eager[1], compiled[1]
    return {
        "compile_bpd_abs_diff": float((bpd_compiled - bpd_eager).abs()),
        "compile_logdet_max_rel_diff": float(
            ((ld_compiled - ld_eager).abs() / ld_eager.abs().clamp_min(1.0)).max()
        ),
    }


def _reset_hwm(device: str) -> None:
    """Start the CPU peak (``VmHWM``) again from the current resident set (Linux
    ``/proc/self/clear_refs``; a no-op elsewhere and on CUDA)."""
    if device == "cpu":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _interleave_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time per training step of autograd and of the invertible backward, alternating in one
    process (``--interleave N``: N rounds, the order rotating each round, after one warm-up step
    of each), so that both modes see the same machine load. Three modes: ``autograd`` and
    ``invertible`` with glibc's steady-state thresholds (32 MiB: what its dynamic threshold
    reaches after data init), ``invertible_returned`` with :func:`return_freed_memory`'s (what
    training uses on the CPU). Returns CPU seconds (all threads) and wall seconds per step."""
    from nfpi.flows import build_flow
    from nfpi.training.heap import return_freed_memory

    device, batch = args.device, args.batch
    torch.manual_seed(0)
    in_shape = (3, args.image_size, args.image_size)
    flow = build_flow(args.worker, in_shape=in_shape, **_spec_overrides(args)).to(device)
    d, k = flow.latent_dim, 10
    means, log_std = torch.randn(k, d, device=device) * 0.1, torch.zeros(k, d, device=device)

    def images(n: int = batch) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.randint(0, 256, (n, *in_shape), device=device).float()
        x = (pixels + torch.rand_like(pixels)) / 256 * 2 - 1
        return x, torch.randint(0, k, (n,), device=device)

    flow.data_init(images(min(batch * 4, 256) if batch > 2 else 8)[0])
    opt = torch.optim.Adamax(flow.parameters(), lr=1e-3)
    big = 32 * 1024 * 1024

    def step(mode: str) -> tuple[float, float]:
        if device == "cpu":
            return_freed_memory(128 * 1024 if mode == "invertible_returned" else big)
        flow.invertible_backward = mode != "autograd"
        x, y = images()
        synchronize(device)
        c0, t0 = time.process_time(), time.perf_counter()
        opt.zero_grad(set_to_none=True)
        z, logdet = flow(x)
        log_p = (-0.5 * (z - means[y]) ** 2 - log_std[y]).sum(1)
        (-(log_p - 0.5 * d * math.log(2 * math.pi) + logdet).mean() / d).backward()
        opt.step()
        synchronize(device)
        return time.perf_counter() - t0, time.process_time() - c0

    modes = ["autograd", "invertible", "invertible_returned"]
    for mode in modes:
        step(mode)  # warm-up (optimiser state, oneDNN primitives)
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    load = [os.getloadavg()[0]]
    for r in range(args.interleave):
        for mode in modes[r % 3 :] + modes[: r % 3]:
            w, c = step(mode)
            wall[mode].append(round(w, 3))
            cpu[mode].append(round(c, 3))
        load.append(os.getloadavg()[0])
    base_cpu, base_wall = statistics.median(cpu["autograd"]), statistics.median(wall["autograd"])
    row: dict[str, Any] = {
        "bench": "interleaved_step",
        "model": args.worker,
        "batch": batch,
        "device": device,
        "rounds": args.interleave,
        "threads": torch.get_num_threads(),
        "loadavg_1min": load,
    }
    for mode in modes:
        row[f"{mode}_cpu_s"] = cpu[mode]
        row[f"{mode}_wall_s"] = wall[mode]
        row[f"{mode}_cpu_ratio"] = round(statistics.median(cpu[mode]) / base_cpu, 3)
        row[f"{mode}_wall_ratio"] = round(statistics.median(wall[mode]) / base_wall, 3)
    return row


def _invertible_checks(flow, loss_fn, images) -> dict[str, Any]:
    """The invertible backward against autograd on this model (float32, its full depth): the
    rebuilt activations' error (:func:`nfpi.flows.reversible.reconstruction_error`) and the
    gradients' largest error relative to the largest gradient of the same parameter."""
    from nfpi.flows.reversible import reconstruction_error

    x, y = images(8)
    rec = reconstruction_error(flow.flow, x)
    grads = {}
    for on in (False, True):
        flow.invertible_backward = on
        flow.zero_grad(set_to_none=True)
        loss_fn(flow, x, y).backward()
        grads[on] = [p.grad.clone() for p in flow.parameters()]
    flow.zero_grad(set_to_none=True)
    rel = max(
        ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
        for a, b in zip(grads[False], grads[True], strict=True)
        if a.abs().max() > 0
    )
    return {
        "rebuild_max_abs_err": float(f"{rec['max_abs']:.3e}"),
        "rebuild_max_rel_err": float(f"{rec['max_rel']:.3e}"),
        "rebuild_input_max_abs_err": float(f"{rec['input_max_abs']:.3e}"),
        "rebuild_layers": rec["layers"],
        "grad_max_rel_err_vs_autograd": float(f"{rel:.3e}"),
    }


def _run_worker(args: list[str], threads: int | None) -> list[dict]:
    """Run this script's worker mode in a fresh process; its last stdout line is JSON."""
    if threads:
        args = [*args, "--threads", str(threads)]
    env = worker_env()
    stdout = run_worker(__file__, args, env)
    rows = json.loads(stdout.strip().splitlines()[-1])
    rows = rows if isinstance(rows, list) else [rows]
    for row in rows:
        row["omp_wait_policy"] = env["OMP_WAIT_POLICY"]
    return rows


# ------------------------------------------------------------------------------------------------
# Matrix exponential on its own
# ------------------------------------------------------------------------------------------------


def matrix_exp_rows(shapes: list[tuple[int, int]], reps: int, device: str) -> list[dict]:
    from nfpi.flows import expm

    rows = []
    impls = {
        "torch_matrix_exp": torch.linalg.matrix_exp,
        "project": expm,
        "taylor_host_sync": taylor_host_sync,
    }
    for n, c in shapes:
        gen = torch.Generator().manual_seed(0)
        # Like the coupling's M = rescale * tanh(...) at its initial rescale 1/c.
        m = (torch.tanh(torch.randn(n, c, c, generator=gen)) / c).to(device)
        g = (torch.randn(n, c, c, generator=gen) / (n * c)).to(device)
        ref = torch.linalg.matrix_exp(m.double())
        for impl, fn in impls.items():
            err = (fn(m).double() - ref).abs().max().item()
            leaf = m.clone().requires_grad_()

            def fwd_bwd(fn=fn, leaf=leaf, g=g) -> None:
                leaf.grad = None
                (fn(leaf) * g).sum().backward()

            for passes, call in (
                ("forward", lambda fn=fn, m=m: fn(m)),
                ("forward_backward", fwd_bwd),
            ):
                rows.append(
                    {
                        "bench": "matrix_exp",
                        "impl": impl,
                        "shape": f"[{n}, {c}, {c}]",
                        "pass": passes,
                        "seconds": round(_best(call, reps, device), 6),
                        "max_abs_err": float(f"{err:.2e}"),
                        "device": device,
                    }
                )
    return rows


# ------------------------------------------------------------------------------------------------


def _print_train(rows: list[dict]) -> None:
    print(
        f"{'model':<14} {'batch':>5} {'expm':<17} {'images/s':>8} {'median':>7} {'GFLOP/img':>9}"
        f" {'GFLOP/s':>8} {'peak GF/s':>9} {'util':>5} {'peak MiB':>8} {'fwd s':>6} {'bwd s':>6}"
        f" {'opt s':>6} {'load':>5}"
    )
    for r in rows:
        expm = r["expm"] + ("+compile" if r["compile"] else "")
        expm = "inv-backward" if r["invertible_backward"] else expm
        expm = "normflows" if r["model"] == PEER else expm
        print(
            f"{r['model']:<14} {r['batch']:>5} {expm:<17} {r['images_per_s']:>8.2f}"
            f" {r['images_per_s_median']:>7.2f} {r['gflop_per_image']:>9.2f}"
            f" {r['achieved_gflops']:>8.1f} {r['peak_gflops']:>9.1f} {r['flop_utilization']:>5.2f}"
            f" {r['peak_mb']:>8} {r['forward_s']:>6.2f} {r['backward_s']:>6.2f}"
            f" {r['optimizer_s']:>6.2f} {r['loadavg_1min']:>5.1f}",
            flush=True,
        )


def _print_profile(row: dict) -> None:
    prof = row["profile"]
    if prof["categories"]:
        total = sum(prof["categories"].values())
        print(f"\nWhere a profiled step's time goes ({row['model']}, batch {row['batch']}, CPU):")
        print(f"{'category':<52} {'seconds':>8} {'share':>6}")
        for name, sec in sorted(prof["categories"].items(), key=lambda kv: -kv[1]):
            print(f"{name:<52} {sec:>8.3f} {100 * sec / total:>5.1f}%")
    print(f"\nTop operators by self {'device' if row['device'] == 'cuda' else 'CPU'} time:")
    print(f"{'operator':<44} {'seconds':>8} {'calls':>6}")
    for op in prof["top_ops"]:
        print(f"{op['op'][:44]:<44} {op['seconds']:>8.3f} {op['calls']:>6}")
    print("\nConvolution shapes (C_in->C_out, kernel, HxW; count in the model; fwd+bwd GFLOP/s):")
    for shape, count, gflops in row["conv_shapes"]:
        print(f"  {shape:<24} x{count:<4} {gflops:>7.1f}")


def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(__doc__.splitlines()[0], "mef-cifar at batch 16, 2 timed steps")
    add_device_arg(p)
    p.add_argument("--models", nargs="+", help="flow presets (default mef-cifar; tiny in smoke)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed training steps per row")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--expm", choices=EXPM, nargs="+", default=list(EXPM), help="rows to run")
    p.add_argument("--profile", action="store_true", help="profile one step of the first row")
    p.add_argument("--compile", action="store_true", help="add a torch.compile(flow) row")
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="only the torch.compile(flow) row (no eager rows, no matrix-exponential rows)",
    )
    p.add_argument("--image-size", type=int, default=32, help="input H = W (default 32)")
    p.add_argument("--hidden", type=int, default=None, help="coupling width (default: preset's)")
    p.add_argument(
        "--invertible-backward",
        action="store_true",
        help="add a row per model that rebuilds activations in backward (memory flat in depth), "
        "with its reconstruction and gradient error against autograd",
    )
    p.add_argument(
        "--peer",
        action="store_true",
        help=f"add a row per model for normflows' Glow of matched parameter count ({PEER}; "
        "pip install -e '.[bench]')",
    )
    p.add_argument(
        "--only-extra",
        action="store_true",
        help="only the project row and the rows the flags add (no release-equivalent row, no "
        "matrix-exponential rows)",
    )
    p.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="N",
        help="add, per model, N rounds of autograd and invertible-backward training steps "
        "alternating in one worker (the time ratio at the same load)",
    )
    p.add_argument(
        "--record", metavar="PATH", help="write {commit, command, date, records} here (published)"
    )
    p.add_argument("--match", help=argparse.SUPPRESS)
    p.add_argument("--interleave-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--shapes", help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_device(args.device)
    if args.peer and importlib.util.find_spec("normflows") is None:
        p.error("--peer needs normflows: pip install -e '.[bench]' (or pip install normflows)")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker == "matrix_exp":
        print(json.dumps(matrix_exp_rows(json.loads(args.shapes), args.reps, args.device)))
        return
    if args.interleave < 0:
        p.error(f"--interleave must be >= 0 rounds, got {args.interleave}")
    if args.interleave_worker:
        print(json.dumps(_interleave_worker(args)))
        return
    if args.worker:
        args.expm = args.expm[0]
        print(json.dumps(_train_worker(args)))
        return

    if args.smoke_test:
        models, batch, steps = args.models or ["tiny"], args.batch or 2, args.steps or 1
        shapes, reps = [(64, 6), (16, 24)], 1
    elif args.quick:
        models, batch, steps = args.models or MODELS, args.batch or 16, args.steps or 2
        shapes, reps = [(16 * 16 * 16, 6), (16 * 8 * 8, 12), (16 * 4 * 4, 24)], 3
    else:
        models, batch, steps = args.models or MODELS, args.batch or 64, args.steps or 3
        shapes, reps = [(64 * 16 * 16, 6), (64 * 8 * 8, 12), (64 * 4 * 4, 24)], 5
    print(
        f"torch {torch.__version__}, {args.device}: {device_name(args.device)}, "
        f"{args.threads or torch.get_num_threads()} threads, {mode_name(args)} mode, workers with "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    records: list[dict] = []
    expms = ["project"] if args.only_extra else args.expm
    # (model, expm, extra worker flags); a row's flags: --compile, --invertible-backward, peer.
    plan = [] if args.compile_only else [(m, e, []) for m in models for e in expms]
    if args.invertible_backward and not args.compile_only:
        plan += [(m, "project", ["--invertible-backward"]) for m in models]
    if args.peer and not args.compile_only:
        plan += [(PEER, "project", ["--match", m]) for m in models]
    if args.compile or args.compile_only:
        plan += [(m, "project", ["--compile"]) for m in models]
    sizes = ["--image-size", str(args.image_size)]
    sizes += [] if args.hidden is None else ["--hidden", str(args.hidden)]
    for i, (model, expm, flags) in enumerate(plan):
        wargs = ["--worker", model, "--batch", str(batch), "--steps", str(steps), *sizes]
        wargs += ["--warmup", str(args.warmup), "--expm", expm, "--device", args.device]
        wargs += (["--profile"] if args.profile and i == 0 else []) + flags
        row = _run_worker(wargs, args.threads)[0]
        records.append(row)
        if model == "mef-cifar" and args.image_size == 32 and args.hidden is None:
            rel = abs(row["params"] - MEF_REFERENCE_PARAMS) / MEF_REFERENCE_PARAMS
            assert rel < 5e-3, f"mef-cifar has {row['params']:,} parameters, reference 42.9 M"
    _print_train(records)
    for model in models:
        by = {
            r["expm"]: r
            for r in records
            if r["model"] == model and not r["compile"] and not r["invertible_backward"]
        }
        if "project" in by and "taylor_host_sync" in by:
            ratio = by["project"]["images_per_s"] / by["taylor_host_sync"]["images_per_s"]
            print(f"{model}: project / release-equivalent images/s = {ratio:.2f}x (target >= 2x)")
        if "project" in by:
            r = by["project"]
            print(
                f"{model}: flop utilisation {r['flop_utilization']:.2f} of the same-run dense "
                f"conv peak {r['peak_gflops']:.1f} GFLOP/s (target >= 0.75); of the model's conv "
                f"mix {r['achieved_gflops'] / r['conv_mix_gflops']:.2f}; "
                f"peak memory {r['peak_mb']} MiB (target <= 3072)"
            )
        inv = [r for r in records if r["model"] == model and r["invertible_backward"]]
        if "project" in by and inv:
            r, base = inv[0], by["project"]
            print(
                f"{model}: invertible backward: peak memory {r['peak_mb']} MiB vs "
                f"{base['peak_mb']} MiB ({r['peak_mb'] / base['peak_mb']:.2f}x), time per step "
                f"{_speedup(base, r)} (target <= 1.35x); gradients vs autograd: max rel err "
                f"{r['grad_max_rel_err_vs_autograd']:.1e}; rebuilt activations over {r['rebuild_layers']} layers: max abs err "
                f"{r['rebuild_max_abs_err']:.1e} (rel {r['rebuild_max_rel_err']:.1e})"
            )
        compiled = [r for r in records if r["model"] == model and r["compile"]]
        if "project" in by and compiled:
            r, base = compiled[0], by["project"]
            print(
                f"{model}: torch.compile / eager images/s = {_speedup(r, base)}; compiled vs "
                f"eager on one batch: bits/dim {r['compile_bpd_abs_diff']:.1e}, log-det max rel "
                f"{r['compile_logdet_max_rel_diff']:.1e}"
            )
        peer = [r for r in records if r["model"] == PEER and r.get("matched_model") == model]
        if "project" in by and peer:
            r, ours = peer[0], by["project"]
            print(
                f"{model} ({ours['params']:,} parameters, width {ours['hidden']}) / normflows "
                f"Glow ({r['params']:,} flow parameters, width {r['hidden']}) images/s = "
                f"{_speedup(ours, r)} (target >= 1.2x)"
            )
    for r in records:
        if "profile" in r:
            _print_profile(r)

    if args.interleave and not args.compile_only:
        for model in models:
            wargs = ["--worker", model, "--interleave-worker", "--interleave", str(args.interleave)]
            wargs += ["--batch", str(batch), *sizes, "--device", args.device]
            r = _run_worker(wargs, args.threads)[0]
            records.append(r)
            print(
                f"{model}: interleaved in one worker, {r['rounds']} rounds, load "
                f"{min(r['loadavg_1min']):.1f}-{max(r['loadavg_1min']):.1f}: median CPU s per step "
                + ", ".join(
                    f"{m} {statistics.median(r[m + '_cpu_s']):.2f}"
                    for m in ("autograd", "invertible", "invertible_returned")
                )
                + f"; invertible / autograd {r['invertible_cpu_ratio']:.2f}x CPU "
                f"({r['invertible_wall_ratio']:.2f}x wall), with freed memory returned "
                f"{r['invertible_returned_cpu_ratio']:.2f}x CPU "
                f"({r['invertible_returned_wall_ratio']:.2f}x wall; target <= 1.35x)"
            )

    if args.compile_only or args.only_extra:
        _write(args, records)
        return
    mrows = _run_worker(
        ["--worker", "matrix_exp", "--shapes", json.dumps(shapes), "--reps", str(reps)]
        + ["--device", args.device],
        args.threads,
    )
    records += mrows
    print(
        f"\n{'shape':<16} {'pass':<17} {'matrix_exp s':>12} {'expm s':>9} {'taylor+sync s':>13}"
        f" {'matrix_exp/expm':>15} {'expm err':>9}"
    )
    for shape in dict.fromkeys(r["shape"] for r in mrows):
        for passes in ("forward", "forward_backward"):
            t = {r["impl"]: r for r in mrows if r["shape"] == shape and r["pass"] == passes}
            ref, ours = t["torch_matrix_exp"]["seconds"], t["project"]["seconds"]
            print(
                f"{shape:<16} {passes:<17} {ref:>12.4f} {ours:>9.4f}"
                f" {t['taylor_host_sync']['seconds']:>13.4f} {ref / ours:>14.2f}x"
                f" {t['project']['max_abs_err']:>9.1e}"
            )
    _write(args, records)


def _write(args: argparse.Namespace, records: list[dict]) -> None:
    if args.out:
        write_records(args.out, records)
    if args.record:
        write_published(args.record, records)


if __name__ == "__main__":
    main()
