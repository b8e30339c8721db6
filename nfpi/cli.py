"""Command line: ``python -m nfpi train`` runs one experiment in this process (no Ray).

Examples::

    python -m nfpi train                                   # digits, tiny flow, CPU
    python -m nfpi train --experiment digits --set prior.method=gd --set optim.epochs=10
    python -m nfpi train --experiment cifar10-quick --set data.root=/data/cifar10 --run-dir runs/c10
    python -m nfpi train --run-dir runs/c10 --experiment cifar10 --set data.root=/data/cifar10 \
        --resume-with optim.lr=1e-3 --resume-with optim.grad_clip=1.0   # resume a diverged run
    python -m nfpi train --run-dir runs/c10 ... --resume-from 40    # from the checkpoint after 40 epochs
    python -m nfpi train --run-dir runs/c10 ... --fresh             # epoch 0 again (old files kept aside)
    python -m nfpi config --experiment cifar10             # print the resolved config
    python -m nfpi config --keys                           # every key: type, default, allowed
    python -m nfpi downstream results/digits --set downstream.kind=cnn \\
        --set cnn.epochs=10 --output-dir results/digits-cnn    # CNN-Acc of a trained flow
    python -m nfpi figures --out results/figures --checkpoint results/digits  # Figures 1-2

A mistake (a bad ``--set``, a missing dataset, a corrupt checkpoint) is one line on stderr
naming the field or path and the fix, exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import pkgutil
import sys
from typing import Any

from nfpi.checks import preflight
from nfpi.config import ExperimentConfig
from nfpi.entry import Parser, add_resume_args, run_cli, setup_logging
from nfpi.errors import ConfigError
from nfpi.presets import EXPERIMENTS, parse_override, resolve_config

__all__ = ["DATA_ROOT_PLACEHOLDER", "catalogue", "describe_keys", "main", "run"]

log = logging.getLogger("nfpi.cli")

# What `python -m nfpi config` shows for a dataset path the experiment needs and was not given.
DATA_ROOT_PLACEHOLDER = "<required: --set data.root=/abs/path>"
INIT_FROM_PLACEHOLDER = "<required: --set flow.init_from=/abs/path/to/pretraining/run>"


def _space_names() -> list[str]:
    """The search spaces (modules of ``search_spaces/``), listed without importing them (they
    import Ray, which the library does not)."""
    spec = importlib.util.find_spec("search_spaces")
    if spec is None or not spec.submodule_search_locations:
        return []
    locations = list(spec.submodule_search_locations)
    return sorted(m.name for m in pkgutil.iter_modules(locations) if not m.name.startswith("_"))


def catalogue() -> str:
    """The named experiments, flow presets and search spaces (the ``--help`` epilogs)."""
    from nfpi.flows import PRESETS

    spaces = _space_names()
    lines = [
        f"experiments (--experiment): {', '.join(EXPERIMENTS)}",
        f"flow presets (--set flow.preset=...): {', '.join(PRESETS)}",
    ]
    if spaces:
        lines.append(f"search spaces (ray_jobs/sweep.py --space): {', '.join(spaces)}")
    lines.append(
        "every config key, its type, default and allowed values: python -m nfpi config --keys"
    )
    return "\n".join(lines)


def describe_keys() -> list[tuple[str, str, Any, tuple[Any, ...], str]]:
    """Every ``--set`` key of an experiment and of a downstream run: ``(key, type, default,
    allowed values, one-line description)``, read from the config classes."""
    from nfpi.downstream import DownstreamConfig

    rows = ExperimentConfig.describe()
    for key, hint, default, allowed, doc in DownstreamConfig.describe():
        dotted = (
            f"cnn.{key[len('classifier.') :]}"
            if key.startswith("classifier.")
            else f"downstream.{key}"
        )
        rows.append((dotted, hint, default, allowed, doc))
    return rows


def _keys_table() -> str:
    """Two lines per key: ``key  type  default: ...  allowed: ...`` and its description."""
    rows = []
    for key, hint, default, allowed, doc in describe_keys():
        shown = json.dumps(default, default=str)
        if allowed:  # the Literal's values are listed instead
            hint = "choice" + (" | None" if "None" in hint else "")
        extra = f"  one of: {' | '.join(map(str, allowed))}" if allowed else ""
        rows.append((key, hint, f"default {shown}{extra}", doc.replace("``", "")))
    widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in ((0, 40), (1, 16))]
    head = f"{'key'.ljust(widths[0])}  {'type'.ljust(widths[1])}  default, allowed values\n    what it is"
    return "\n".join(
        [head]
        + [
            f"{key.ljust(widths[0])}  {hint.ljust(widths[1])}  {rest}\n    {doc or '-'}"
            for key, hint, rest, doc in rows
        ]
    )


def _config_or_placeholder(args: argparse.Namespace) -> tuple[ExperimentConfig, list[str]]:
    """The resolved config and the keys shown with a placeholder: an experiment that needs
    ``data.root`` (or, fine-tuning, ``flow.init_from``) and was not given one is shown with
    :data:`DATA_ROOT_PLACEHOLDER` (:data:`INIT_FROM_PLACEHOLDER`) instead of failing."""
    placeholders = {"data.root": DATA_ROOT_PLACEHOLDER, "flow.init_from": INIT_FROM_PLACEHOLDER}
    sets, shown = list(args.set), []
    while True:
        try:
            return resolve_config(args.experiment, sets, args.config_file), shown
        except ConfigError as err:
            if err.field not in placeholders or err.value is not None or err.field in shown:
                raise
            sets.append(f"{err.field}={placeholders[err.field]}")
            shown.append(err.field)


def _add_set(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m nfpi", description=__doc__.split("\n\n")[0], epilog=catalogue())
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "train one experiment"),
        ("config", "print the resolved config (or, with --keys, every key)"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=catalogue())
        p.add_argument(
            "--experiment",
            default="digits",
            choices=list(EXPERIMENTS),
            metavar="NAME",
            help="a named experiment (listed below)",
        )
        p.add_argument(
            "--config", dest="config_file", help="a JSON config (e.g. a run's config.json)"
        )
        _add_set(p, "dotted override, e.g. prior.objective.lam=300 (repeatable)")
        if name == "train":
            p.add_argument("--run-dir", help="run directory (default: results/<experiment>)")
            p.add_argument(
                "--resume-with",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="resume the run directory's checkpoint with a new optim.lr, optim.grad_clip, "
                "optim.warmup_steps or optim.epochs (repeatable; what a diverged run needs)",
            )
            add_resume_args(p)
        else:
            p.add_argument(
                "--keys",
                action="store_true",
                help="list every key with its type, default and allowed values",
            )
    p = sub.add_parser("downstream", help="CNN-Acc or NF augmentation of a trained flow")
    p.add_argument("checkpoint", help="a run directory or one of its checkpoints")
    _add_set(p, "downstream.* / cnn.* settings, e.g. downstream.kind=augment (repeatable)")
    p.add_argument("--output-dir", default="results/downstream")
    p.add_argument("--device", default="cpu")
    from nfpi import figures

    figures.add_arguments(sub.add_parser("figures", help="the paper's Figures 1 and 2 as PNGs"))
    if not (sys.argv[1:] if argv is None else argv):  # bare `python -m nfpi`: what it can do
        sys.stderr.write(
            parser.format_help()
            + "\nerror: name a command, e.g. python -m nfpi train (each has --help)\n"
        )
        return 2
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    if args.command == "downstream":
        return _downstream(args)
    if args.command == "figures":
        written, _ = figures.run_from_args(args)
        for path in written:
            print(path)
        return 0
    if args.command == "config":
        if args.keys:
            print(_keys_table())
            return 0
        config, placeholders = _config_or_placeholder(args)
        print(json.dumps(config.to_dict(), indent=2, default=str))
        if "data.root" in placeholders:
            log.info("data.root: required for %s (--set data.root=/abs/path)", config.data.name)
        if "flow.init_from" in placeholders:
            log.info("flow.init_from: required to fine-tune (--set flow.init_from=/abs/path)")
        return 0
    config = resolve_config(args.experiment, args.set, args.config_file)
    for warning in preflight(config):
        log.warning(warning)
    from nfpi.checkpoint import resolve_resume_from
    from nfpi.training import Trainer

    run_dir = args.run_dir or f"results/{config.name}"
    resume_with = dict(parse_override(s) for s in args.resume_with)
    resume_from = resolve_resume_from(run_dir, args.resume_from) if args.resume_from else None
    history = Trainer(
        config, run_dir, resume_overrides=resume_with, resume_from=resume_from, fresh=args.fresh
    ).fit()
    final = history[-1]
    print(json.dumps({k: round(v, 5) for k, v in final.items()}, indent=None))
    print(f"run directory: {run_dir}")
    return 0


def _downstream(args: argparse.Namespace) -> int:
    from nfpi.checkpoint import find_checkpoint
    from nfpi.device import resolve_device
    from nfpi.downstream import DownstreamConfig, run_downstream
    from nfpi.errors import CheckpointError

    config = DownstreamConfig.from_overrides(dict(parse_override(s) for s in args.set))
    resolve_device(args.device)  # --device cuda without a GPU: a named error, before any work
    if find_checkpoint(args.checkpoint) is None:
        raise CheckpointError(
            f"no checkpoint at {args.checkpoint}: pass a run directory (e.g. results/digits), "
            "its checkpoints/ folder, an epoch-NNNN folder or a state.pt"
        )
    result = run_downstream(args.checkpoint, config, args.output_dir, device=args.device)
    shown = {k: round(v, 5) for k, v in result.metrics.items() if "_class_" not in k}
    print(json.dumps(shown))
    print(f"output: {args.output_dir}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """``main`` with one-line errors (:func:`nfpi.entry.run_cli`): what ``python -m nfpi``
    runs."""
    return run_cli(main, argv, prog="python -m nfpi")


if __name__ == "__main__":
    sys.exit(run())
