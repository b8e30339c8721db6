"""Look at a sweep's MLflow store in a real browser (headless Chromium) and take screenshots.

    python tests/mlflow_ui_check.py --results-dir /tmp/ui --out /tmp/ui/shots   # runs the smoke sweep first
    python tests/mlflow_ui_check.py --results-dir results --out shots            # an existing store

Starts ``mlflow server`` on a free localhost port for the store under ``--results-dir`` (running
``ray_jobs/sweep.py --space smoke`` there first when it holds no sweep), opens the links the
sweep prints (:func:`ray_jobs.tracking.ui_url`) in a fresh Chromium profile, and checks what a
user sees:

1. ``runs.png``: the sweep's link opens the training view (a runs table, not the GenAI
   overview) in the sweep's saved view: every child run by its label, grouped by the prior
   method, with the varied params and the metrics as columns;
2. ``parent_comparison.png``: the parent run's ``comparison.png`` artifact is displayed (an
   image that loaded), next to ``results.md`` and ``results.csv``; its overview lists the best
   value per group (``best_nf_acc.<group>``);
3. ``child_pictures.png``: a child run's ``plots/kl_heatmap_final.png`` is displayed, and its
   artifacts hold the same picture names as every other child's, and its overview lists its
   datasets and logged model.

Prints one line per check and exits 1 if any fails. ``tests/ray_jobs/test_mlflow_ui.py`` runs it
on a small store when Chromium is installed (``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from cdp import Browser
from mlflow.tracking import MlflowClient

from ray_jobs.mlflow_logging import VIEW_TAG_PREFIX
from ray_jobs.tracking import ui_url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(uri: str, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.terminate()
                raise RuntimeError(f"mlflow server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)  # polled: the server answers /health once it serves


def store_facts(uri: str, experiment: str) -> dict:
    """The sweep in the store: experiment id, parent run, child runs (id, label, artifacts)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {uri}")
    runs = client.search_runs([exp.experiment_id], order_by=["start_time DESC"])
    parent = next(r for r in runs if "nfpi.sweep" in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]

    def pictures(run_id: str) -> set[str]:
        return {
            Path(a.path).name
            for a in client.list_artifacts(run_id, "plots")
            if a.path.endswith(".png")
        }

    views = [
        k[len(VIEW_TAG_PREFIX) :]
        for k in exp.tags
        if k.startswith(VIEW_TAG_PREFIX) and parent.info.run_id[:8] in k
    ]
    return {
        "experiment_id": exp.experiment_id,
        "view": views[0] if views else None,
        "parent": parent.info.run_id,
        "parent_name": parent.info.run_name,
        "children": [
            {"id": c.info.run_id, "label": c.info.run_name, "pictures": pictures(c.info.run_id)}
            for c in children
        ],
    }


# The artifact viewer shows a PNG as an <img> whose src is a blob: URL and whose alt is the
# file's name; the page is the training view only with this query (else the GenAI view).
def _image_shown(name: str) -> str:
    return (
        f"[...document.images].some(i => (i.alt.includes('{name}') || i.src.includes('{name}'))"
        " && i.complete && i.naturalWidth > 100)"
    )


TRAINING = "workflowType=machine_learning"


async def _tidy(b: Browser) -> None:
    """Close what covers the page on a first visit (the assistant panel, the shared-view
    banner), so that the screenshots show the runs."""
    await b.evaluate(
        'document.querySelectorAll(\'button[aria-label="Close"], '
        'button[aria-label="Hide banner"]\').forEach(e => e.click())'
    )


async def _look(base: str, facts: dict, out: Path) -> list[tuple[str, bool, str]]:
    results: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        results.append((name, bool(ok), detail))

    exp = facts["experiment_id"]
    labels = [c["label"] for c in facts["children"]]
    async with Browser() as b:
        # 1. The sweep's trials, through the link the sweep prints: the training view's runs
        # table in the sweep's saved view (trials grouped, their params and metrics as columns).
        await b.open(ui_url(exp, view=facts["view"], base=base))
        try:
            for label in labels:
                await b.wait_for_text(label, timeout=90)
            await b.wait_for_text("Run Name", timeout=30)
            await _tidy(b)
            text = await b.text()
            columns = ("prior.method", "nf_acc", "test_bpd")
            check(
                "the sweep's link opens its trials in the training view",
                "Token Usage" not in text and all(c in text for c in columns),
                f"runs table: {', '.join(labels)}; columns {', '.join(columns)}",
            )
        except TimeoutError as err:
            check("the sweep's link opens its trials in the training view", False, str(err))
        await b.screenshot(out / "runs.png")

        # 2. The parent run: the comparison plot, the results files, the best metrics.
        parent = facts["parent"]
        await b.open(
            f"{base}/#/experiments/{exp}/runs/{parent}/artifactPath/comparison.png?{TRAINING}"
        )
        try:
            await b.wait_for(
                _image_shown("comparison.png"),
                "the comparison plot",
                timeout=90,
            )
            await _tidy(b)
            text = await b.text()
            check(
                "parent run shows the comparison plot",
                all(f in text for f in ("results.md", "results.csv", "comparison.png")),
                "comparison.png displayed; results.md and results.csv listed",
            )
        except TimeoutError as err:
            check("parent run shows the comparison plot", False, str(err))
        await b.screenshot(out / "parent_comparison.png")
        await b.open(f"{base}/#/experiments/{exp}/runs/{parent}?workflowType=machine_learning")
        try:
            await b.wait_for_text("best_nf_acc.", timeout=60)
            text = await b.text()
            check(
                "parent run lists the best value per group",
                all(f"best_nf_acc.{label.split()[0]}" in text for label in labels),
                "best_nf_acc.<group> metrics",
            )
        except TimeoutError as err:
            check("parent run lists the best value per group", False, str(err))
        await b.screenshot(out / "parent_overview.png")

        # 3. A child run: its pictures (the same names for every child), datasets, model.
        child = next((c for c in facts["children"] if c["label"].startswith("fpi")), None)
        child = child or facts["children"][0]
        same = len({frozenset(c["pictures"] - {p for p in c["pictures"] if "_v" in p})
                    for c in facts["children"]}) == 1  # fmt: skip
        check(
            "every child run has the same pictures (FPI adds its per-solve ones)",
            same and all("kl_heatmap_final.png" in c["pictures"] for c in facts["children"]),
            "; ".join(f"{c['label']}: {sorted(c['pictures'])}" for c in facts["children"]),
        )
        await b.open(
            f"{base}/#/experiments/{exp}/runs/{child['id']}/artifactPath/plots/kl_heatmap_final.png"
            f"?{TRAINING}"
        )
        try:
            await b.wait_for(
                _image_shown("kl_heatmap_final.png"),
                "the child's KL heatmap",
                timeout=90,
            )
            await _tidy(b)
            check("child run shows its pictures", True, f"{child['label']}: kl_heatmap_final.png")
        except TimeoutError as err:
            check("child run shows its pictures", False, str(err))
        await b.screenshot(out / "child_pictures.png")
        await b.open(f"{base}/#/experiments/{exp}/runs/{child['id']}?workflowType=machine_learning")
        try:
            await b.wait_for_text("-train", timeout=60)
            text = await b.text()
            check(
                "child run lists its datasets and model",
                # The overview lists the first dataset and folds the rest into "+1" when the
                # panel is narrow (a run with many metrics).
                ("-test" in text or re.search(r"-train \(\w+\)\s*Training\s*\+1", text))
                and "model" in text.lower(),
                "datasets <name>-train / <name>-test (or '+1') and the logged model",
            )
        except TimeoutError as err:
            check("child run lists its datasets and model", False, str(err))
        await b.screenshot(out / "child_overview.png")
    return results


def check_ui(uri: str, experiment: str, out: Path, log_dir: Path) -> list[tuple[str, bool, str]]:
    """Serve the store, look at it in Chromium, return ``(check, passed, detail)`` rows."""
    facts = store_facts(uri, experiment)
    port = _free_port()
    server = _server(uri, port, log_dir / "mlflow-server.log")
    try:
        return asyncio.run(_look(f"http://127.0.0.1:{port}", facts, out))
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", required=True, help="a sweep's --results-dir")
    parser.add_argument("--out", help="folder for the screenshots (default: <results>/ui)")
    parser.add_argument("--mlflow-experiment", default="nfpi")
    args = parser.parse_args(argv)
    results = Path(args.results_dir).resolve()
    out = Path(args.out).resolve() if args.out else results / "ui"
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{results / 'mlflow.db'}"
    if not (results / "mlflow.db").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "ray_jobs" / "sweep.py"), "--space", "smoke",
             "--results-dir", str(results), "--set", "eval.plots=true"],
            check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    rows = check_ui(uri, args.mlflow_experiment, out, out)
    for name, ok, detail in rows:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    (out / "checks.json").write_text(json.dumps(rows, indent=1))
    print(f"screenshots: {out}")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
