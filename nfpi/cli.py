"""Command line: ``python -m nfpi train`` runs one experiment in this process (no Ray).

Examples::

    python -m nfpi train                                   # digits, tiny flow, CPU
    python -m nfpi train --experiment digits --set prior.method=gd --set optim.epochs=10
    python -m nfpi train --experiment cifar10 --set data.root=/data/cifar10 --run-dir runs/c10
    python -m nfpi train --run-dir runs/c10 --experiment cifar10 --set data.root=/data/cifar10 \
        --resume-with optim.lr=1e-3 --resume-with optim.grad_clip=1.0   # resume a diverged run
    python -m nfpi config --experiment digits              # print the resolved config
    python -m nfpi downstream results/digits --set downstream.kind=cnn \\
        --set cnn.epochs=10 --output-dir results/digits-cnn    # CNN-Acc of a trained flow
    python -m nfpi figures --out results/figures --checkpoint results/digits  # Figures 1-2
"""

from __future__ import annotations

import argparse
import json
import logging

from nfpi.presets import EXPERIMENTS, parse_override, resolve_config

__all__ = ["main"]


def _add_set(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nfpi", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "train one experiment"),
        ("config", "print the resolved config"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--experiment", default="digits", choices=sorted(EXPERIMENTS))
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
    p = sub.add_parser("downstream", help="CNN-Acc or NF augmentation of a trained flow")
    p.add_argument("checkpoint", help="a run directory or one of its checkpoints")
    _add_set(p, "downstream.* / cnn.* settings, e.g. downstream.kind=augment (repeatable)")
    p.add_argument("--output-dir", default="results/downstream")
    p.add_argument("--device", default="cpu")
    from nfpi import figures

    figures.add_arguments(sub.add_parser("figures", help="the paper's Figures 1 and 2 as PNGs"))
    args = parser.parse_args(argv)
    if args.command == "downstream":
        return _downstream(args)
    if args.command == "figures":
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        written, _ = figures.run_from_args(args)
        for path in written:
            print(path)
        return 0
    config = resolve_config(args.experiment, args.set, args.config_file)
    if args.command == "config":
        print(json.dumps(config.to_dict(), indent=2, default=str))
        return 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from nfpi.training import Trainer

    run_dir = args.run_dir or f"results/{config.name}"
    resume_with = dict(parse_override(s) for s in args.resume_with)
    history = Trainer(config, run_dir, resume_overrides=resume_with).fit()
    final = history[-1]
    print(json.dumps({k: round(v, 5) for k, v in final.items()}, indent=None))
    print(f"run directory: {run_dir}")
    return 0


def _downstream(args: argparse.Namespace) -> int:
    from nfpi.downstream import DownstreamConfig, run_downstream

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = DownstreamConfig.from_overrides(dict(parse_override(s) for s in args.set))
    result = run_downstream(args.checkpoint, config, args.output_dir, device=args.device)
    shown = {k: round(v, 5) for k, v in result.metrics.items() if "_class_" not in k}
    print(json.dumps(shown))
    print(f"output: {args.output_dir}")
    return 0
