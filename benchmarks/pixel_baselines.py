"""Pixel baselines: scikit-learn classifiers fitted to the raw pixels of the split a flow sees.

    python benchmarks/pixel_baselines.py [--quick | --smoke-test] [--out PATH] [--record PATH]
        [--datasets cifar10,digits] [--sizes 16,32] [--pca 25,50,100,200] [--data TARBALL]
        [--models qda,lda,gnb,logreg] [--items-per-class N] [--flow RUN_DIR ...]

The yardstick for NF-Acc (issue 23): a class-conditional flow's latent gaussians should classify
clearly better than gaussians fitted to the pixels themselves. Each dataset is loaded exactly as
the training loop loads it (``load_dataset`` with the experiment's ``data.split_kwargs``, seed 0):
``cifar10`` is the ``cifar10_cpu`` experiment's split (the JPEG tarball, all 50k training and 10k
test images, resized to ``--sizes``; ``--items-per-class N``: the seeded training subset a flow of
``data.items_per_class = N`` sees), ``digits`` the ``digits`` experiment's (1437 / 360). Features
are the pixel values scaled to [0, 1]. Models, each fitted on the training split and scored on
the test split:

- ``qda``: quadratic discriminant analysis (one full-covariance gaussian per class) on the first k
  principal components of the training pixels, k in ``--pca``, covariance regularisation 0.01 and
  0.1 (``reg_param``; the better on the *test* set is reported, an optimistic baseline);
- ``lda``: linear discriminant analysis on all pixels (shared covariance, ``svd`` solver);
- ``gnb``: gaussian naive Bayes on all pixels (diagonal covariance per class);
- ``logreg``: multinomial logistic regression on standardised pixels (lbfgs, C = 1, 300 iterations).

``--flow RUN_DIR`` (repeatable; named by its last two path parts; a finished run directory, e.g. of ``cifar10_cpu.py --keep``) fits
the same models to that flow's latents z of its own training and test splits instead of the pixels
(the inputs dequantised with seeded noise, as the loop's evaluation does), and adds the flow's own
prior as the model ``nf_prior`` (its NF-Acc, on the training split too). This is what separates
the flow's latent space from the classifier put on it: ``gnb`` on the latents is the diagonal
gaussians refitted to the latents' class moments (what the prior would be without the KLD term),
``qda`` the full-covariance ones.

Records: ``features`` (``pixels`` or ``latents``), ``flow`` (the run directory's name, null for
pixels), ``dataset``, ``size`` (side in pixels; 8 for digits), ``d``, ``model``, ``k`` (PCA
components, null for the others), ``reg`` (QDA's reg_param), ``train_n``, ``test_n``,
``train_acc``, ``test_acc``, ``seconds``.

``--quick``: 200 training / 100 test images per class of CIFAR-10 at 16 x 16, PCA 25 and 50.
``--smoke-test``: a generated 3-class JPEG ImageFolder (8 + 4 images per class) and digits, in
seconds.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, benchmark_parser, mode_name, write_published, write_records

from nfpi.data import load_dataset
from nfpi.presets import experiment_config

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
MODELS = ("qda", "lda", "gnb", "logreg")
DATASETS = ("cifar10", "digits")
QDA_REGS = (0.01, 0.1)


def _split(experiment: str, overrides: dict[str, Any], split: str) -> tuple[np.ndarray, ...]:
    """``(X, y)`` of one split as the training loop loads it: X float64 [N, d] in [0, 1]."""
    cfg = experiment_config(experiment, overrides)
    ds, info = load_dataset(cfg.data.name, split, seed=cfg.seed, **cfg.data.split_kwargs(split))
    if hasattr(ds, "images"):
        x = ds.images
    else:  # files: decode them once
        x = np.stack([ds.load(i).numpy() for i in range(len(ds))])
    x = np.asarray(x, dtype=np.float64).reshape(len(ds), -1) / (info.levels - 1)
    return x, ds.targets.numpy()


def _latent_split(model: Any, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(Z, y, nf_prediction)`` of a trained flow's own ``split``: Z float64 [N, d] latents of
    the inputs dequantised with seeded noise (as the loop's evaluation), and the class its prior
    gives each (NF-Acc's argmax)."""
    import torch

    from nfpi.data.quantization import dequantize

    cfg = model.config
    ds, info = load_dataset(cfg.data.name, split, seed=cfg.seed, **cfg.data.split_kwargs(split))
    gen = torch.Generator().manual_seed(cfg.seed)
    zs, ys, preds = [], [], []
    loader = torch.utils.data.DataLoader(ds, batch_size=500, shuffle=False)
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0], batch[1]
            z, _ = model.flow(dequantize(x, gen, levels=info.levels))
            zs.append(z.double().numpy())
            ys.append(y.numpy())
            preds.append(model.prior.classify(z).numpy())
    return np.concatenate(zs), np.concatenate(ys), np.concatenate(preds)


def _fits(
    models: tuple[str, ...], pca_ks: list[int], xtr: np.ndarray, ytr: np.ndarray
) -> list[tuple[str, int | None, float | None, Any]]:
    """``(model, k, reg, predict)`` for every model and setting; ``predict`` maps pixels to labels."""
    import warnings

    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import (
        LinearDiscriminantAnalysis,
        QuadraticDiscriminantAnalysis,
    )
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = []
    if "qda" in models:
        for k in [k for k in pca_ks if k < min(xtr.shape)]:
            pca = PCA(n_components=k, random_state=0).fit(xtr)
            ztr = pca.transform(xtr)
            for reg in QDA_REGS:
                qda = QuadraticDiscriminantAnalysis(reg_param=reg).fit(ztr, ytr)
                out.append(("qda", k, reg, lambda x, p=pca, q=qda: q.predict(p.transform(x))))
    if "lda" in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # collinear pixels (digits' constant borders)
            lda = LinearDiscriminantAnalysis(solver="svd").fit(xtr, ytr)
        out.append(("lda", None, None, lda.predict))
    if "gnb" in models:
        out.append(("gnb", None, None, GaussianNB().fit(xtr, ytr).predict))
    if "logreg" in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lbfgs may stop at max_iter: a baseline either way
            lr = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=300))
            lr.fit(xtr, ytr)
        out.append(("logreg", None, None, lr.predict))
    return out


def run_dataset(
    name: str, size: int, experiment: str, overrides: dict[str, Any], models, pca_ks
) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    train = _split(experiment, overrides, "train")
    test = _split(experiment, overrides, "test")
    print(
        f"{name} {size} x {size}: {len(train[1])} train / {len(test[1])} test images, d = "
        f"{train[0].shape[1]} (loaded in {time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    head = {"features": "pixels", "flow": None, "dataset": name, "size": size}
    return fit_and_score(head, train, test, models, pca_ks)


def run_flow(run_dir: Path, models, pca_ks) -> list[dict[str, Any]]:
    """The models on a trained flow's latents, and the flow's own prior (``nf_prior``)."""
    from nfpi.checkpoint import load_trained

    t0 = time.perf_counter()
    model = load_trained(run_dir)
    *train, nf_train = _latent_split(model, "train")
    *test, nf_test = _latent_split(model, "test")
    cfg = model.config
    print(
        f"latents of {run_dir.name} ({cfg.data.name}, epoch {model.epoch}): {len(train[1])} train / "
        f"{len(test[1])} test images, d = {train[0].shape[1]} (encoded in "
        f"{time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    head = {
        "features": "latents",
        "flow": f"{run_dir.parent.name}/{run_dir.name}",  # e.g. a --keep folder's fpi-s0
        "dataset": cfg.data.name,
        "size": int(model.info.shape[-1]),
    }
    records = fit_and_score(head, train, test, models, pca_ks)
    records.append(
        {
            **head,
            "d": int(train[0].shape[1]),
            "model": "nf_prior",
            "k": None,
            "reg": None,
            "train_n": len(train[1]),
            "test_n": len(test[1]),
            "train_acc": float((nf_train == train[1]).mean()),
            "test_acc": float((nf_test == test[1]).mean()),
            "seconds": 0.0,
        }
    )
    print(
        f"  nf_prior                 train {records[-1]['train_acc']:.4f}  test "
        f"{records[-1]['test_acc']:.4f}",
        flush=True,
    )
    return records


def fit_and_score(head: dict[str, Any], train, test, models, pca_ks) -> list[dict[str, Any]]:
    """Every model fitted on ``train`` = (X, y) and scored on both splits."""
    (xtr, ytr), (xte, yte) = train, test
    records = []
    t_fit = time.perf_counter()
    for model, k, reg, predict in _fits(models, pca_ks, xtr, ytr):
        rec = {
            **head,
            "d": int(xtr.shape[1]),
            "model": model,
            "k": k,
            "reg": reg,
            "train_n": len(ytr),
            "test_n": len(yte),
            "train_acc": float((predict(xtr) == ytr).mean()),
            "test_acc": float((predict(xte) == yte).mean()),
            "seconds": time.perf_counter() - t_fit,  # fit (shared PCA counted once) + predict
        }
        t_fit = time.perf_counter()
        records.append(rec)
        print(
            f"  {model:<7} k={k or '-':<4} reg={reg or '-':<5} train {rec['train_acc']:.4f}  "
            f"test {rec['test_acc']:.4f}",
            flush=True,
        )
    return records


def best_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, size, model, k): the QDA regularisation with the best test accuracy."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in records:
        key = (r["features"], r["flow"], r["dataset"], r["size"], r["model"], r["k"])
        if key not in best or r["test_acc"] > best[key]["test_acc"]:
            best[key] = r
    return list(best.values())


def table(records: list[dict[str, Any]]) -> str:
    rows = [
        "| features | dataset | size | model | PCA k | reg | train acc (%) | test acc (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in best_rows(records):
        features = r["features"] if r["flow"] is None else f"latents of {r['flow']}"
        rows.append(
            f"| {features} | {r['dataset']} | {r['size']} | {r['model']} | {r['k'] or '-'} | "
            f"{r['reg'] or '-'} | {100 * r['train_acc']:.2f} | {100 * r['test_acc']:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__.split("\n\n")[0], "200+100 CIFAR-10 images per class at 16 x 16 (~1 min)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 JPEG tarball")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset")
    parser.add_argument("--sizes", default="16", help="CIFAR-10 sides, e.g. 16,32 (default 16)")
    parser.add_argument("--pca", default="25,50,100,200", help="QDA's PCA components")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument(
        "--items-per-class", type=int, help="CIFAR-10 training images per class (default all)"
    )
    parser.add_argument(
        "--flow",
        action="append",
        default=[],
        type=Path,
        metavar="RUN_DIR",
        help="also fit the models to this trained flow's latents (repeatable)",
    )
    parser.add_argument(
        "--record", metavar="PATH", help="write {commit, command, date, records} here (published)"
    )
    args = parser.parse_args(argv)
    datasets = tuple(s for s in args.datasets.split(",") if s)
    models = tuple(s for s in args.models.split(",") if s)
    if not datasets or any(d not in DATASETS for d in datasets):
        parser.error(f"--datasets {args.datasets!r}: choose from {', '.join(DATASETS)}")
    if not models or any(m not in MODELS for m in models):
        parser.error(f"--models {args.models!r}: choose from {', '.join(MODELS)}")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
        pca_ks = [int(s) for s in args.pca.split(",") if s]
    except ValueError:
        parser.error("--sizes and --pca take comma-separated integers, e.g. --sizes 16,32")
    if not sizes or min(sizes) < 1 or not pca_ks or min(pca_ks) < 1:
        parser.error("--sizes and --pca need at least one integer >= 1 each")
    if args.items_per_class is not None and args.items_per_class < 1:
        parser.error("--items-per-class must be >= 1")

    work = tempfile.TemporaryDirectory(prefix="pixel_baselines-")
    cifar: dict[str, Any] = {}
    data = args.data.expanduser().resolve()
    if args.smoke_test:
        from cifar10_cpu import smoke_imagefolder

        data = smoke_imagefolder(Path(work.name) / "data")
        sizes, pca_ks = [16], [2]
    elif args.quick:
        cifar = {"data.items_per_class": 200, "data.test_items_per_class": 100}
        sizes, pca_ks = [16], [25, 50]
    if args.items_per_class is not None:
        cifar["data.items_per_class"] = args.items_per_class
    if "cifar10" in datasets and not data.exists():
        print(
            f"error: no CIFAR-10 data at {data}: pass --data with the cifar10-jpeg.tar.gz tarball "
            "(or leave cifar10 out of --datasets)",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    if "cifar10" in datasets:
        for size in sizes:
            overrides = {**cifar, "data.root": str(data), "data.image_size": size}
            records += run_dataset("cifar10", size, "cifar10_cpu", overrides, models, pca_ks)
    if "digits" in datasets:
        records += run_dataset("digits", 8, "digits", {}, models, [k for k in pca_ks if k < 64])
    for run_dir in args.flow:
        records += run_flow(run_dir.expanduser().resolve(), models, pca_ks)
    print(
        f"\nPixel baselines ({mode_name(args)}, {time.perf_counter() - t0:.0f} s; QDA: the better "
        f"of reg_param {', '.join(map(str, QDA_REGS))} on the test set)"
    )
    print(table(records))
    if args.out:
        write_records(args.out, records)
    if args.record:
        write_published(args.record, records)
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
