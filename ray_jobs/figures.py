"""The paper's Figures 1 and 2 as PNGs and as MLflow artifacts of the run that made them.

    python ray_jobs/figures.py --checkpoint results/runs/<flow run> --results-dir results
    python ray_jobs/figures.py --figures 1 --set form=paper --set lam_large=3333

A thin wrapper of :mod:`nfpi.figures` (same options as ``python -m nfpi figures``): it opens an
MLflow run named ``figures`` (or ``--run-name``) in the results directory's store, logs the
figure settings as params and the PNGs and their ``figures.json`` summary as artifacts under
``figures/``, and writes the files to ``--out`` (default: ``<results-dir>/runs/<run name>``).
No Ray is started: drawing the figures takes seconds on one process.
"""

from __future__ import annotations

import sys

from nfpi import figures
from nfpi.entry import Parser, run_cli, setup_logging
from ray_jobs.settings import results_dir_of
from ray_jobs.tracking import RunLogger, resolve_tracking, start_run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    figures.add_arguments(parser)
    parser.set_defaults(out=None)
    parser.add_argument(
        "--results-dir",
        help="the MLflow store's folder (default: as ray_jobs/sweep.py's: $NFPI_RESULTS, else "
        "~/nfpi-results under ray job submit, else ./results)",
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the results dir's)")
    parser.add_argument("--mlflow-experiment", default="nfpi", help="MLflow experiment name")
    parser.add_argument("--run-name", default="figures", help="the MLflow run's name")
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    figures.check_args(args)  # before an MLflow run is opened
    results = results_dir_of(args.results_dir)
    if args.out is None:
        args.out = str(results / "runs" / args.run_name)
    tracking = resolve_tracking(results, args.tracking_uri, args.mlflow_experiment)
    run_id = start_run(tracking, args.run_name, tags={"nfpi.figures": "1"})
    logger = RunLogger(tracking, run_id)
    logger.params(
        {
            "figures": list(args.figures),
            "data": args.data or str(figures.default_golden_path()),
            "checkpoint": args.checkpoint,
            "classes": args.classes,
            "variants": args.variants,
            "set": list(args.set),
        }
    )
    try:
        written, _ = figures.run_from_args(args)
    except BaseException:
        logger.finish("FAILED")
        raise
    for path in written:
        logger.artifact(path, "figures")
    logger.finish()
    for path in written:
        print(path)
    print(f"MLflow: {tracking.uri} (experiment {tracking.experiment!r}, run {run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="ray_jobs/figures.py"))
