"""What a new user meets first: where results go, what the first lines say, and one clear line
for each common mistake (issue 21)."""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from nfpi.errors import ClusterStartError, ConfigError
from ray_jobs.settings import (
    HOME_RESULTS,
    RESULTS_ENV,
    check_reachable,
    default_results_dir,
    results_dir_of,
)
from ray_jobs.tracking import ui_command


# ------------------------------------------------------------------------ the results' default
def test_results_default_is_nfpi_results_then_home_under_a_job_then_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for key in (RESULTS_ENV, "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(key, raising=False)
    assert default_results_dir() == tmp_path / "results"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what a submitted job has
    assert default_results_dir() == Path(HOME_RESULTS).expanduser()
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "shared"))
    assert default_results_dir() == tmp_path / "shared"
    assert results_dir_of(None) == tmp_path / "shared"
    assert results_dir_of(str(tmp_path / "x")) == tmp_path / "x"  # the flag wins


def test_results_dir_that_is_a_file_is_one_line(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    for given in (file, file / "sub"):
        with pytest.raises(ConfigError, match="is a file"):
            results_dir_of(str(given))


def test_ui_command_is_venv_qualified_and_names_the_port():
    cmd = ui_command("sqlite:////tmp/r/mlflow.db", port=5001)
    assert "mlflow ui --backend-store-uri sqlite:////tmp/r/mlflow.db" in cmd
    assert cmd.endswith("--port 5001") and os.path.isabs(cmd.split()[0])
    assert "tracking server" in ui_command("http://10.0.0.1:5000")


def test_unreachable_address_fails_fast_in_one_line():
    with pytest.raises(ClusterStartError, match="cannot reach Ray at ray://nowhere.invalid:10001"):
        check_reachable("ray://nowhere.invalid:10001", timeout=2)
    with pytest.raises(ClusterStartError, match="not a Ray address"):
        check_reachable("ray://a b:c")


# ----------------------------------------------------------------------------- ray job submit
@pytest.mark.slow
@pytest.mark.cluster
def test_jobs_submitted_to_a_ray_start_head_keep_their_results_after_the_session(
    tmp_path, ray_head
):
    """Two ``ray job submit`` jobs against one ``ray start --head`` (token auth on), at once:

    * the README's `ray job submit -- python ray_jobs/train.py` with no --results-dir: the
      results land in ~/nfpi-results (HOME is a temporary folder here), the job's first lines
      say so with the `mlflow ui` command, and they are there after the Ray session has ended;
    * one with an absolute ``--results-dir``: it succeeds, prints its final metrics, and its
      MLflow store is where the flag said (absolute paths survive the job's working dir).
    """
    home = tmp_path / "home"
    home.mkdir()
    submit = ray_head(HOME=str(home))
    given = tmp_path / "given"
    jobs = {
        "default": ("python", "ray_jobs/train.py", "--smoke-test", "--set", "eval.plots=false"),
        "flag": (
            "python", "ray_jobs/train.py", "--smoke-test", "--results-dir", str(given / "results"),
            "--set", "eval.plots=false",
        ),
    }  # fmt: skip
    with ThreadPoolExecutor(len(jobs)) as pool:  # the head has 2 CPUs: one per job's worker
        futures = {name: pool.submit(submit, *entrypoint) for name, entrypoint in jobs.items()}
        outs = {name: future.result() for name, future in futures.items()}

    out = outs["flag"]
    assert out.returncode == 0, (
        out.stdout[-2000:] + out.stderr[-2000:] + out.head_log.read_text()[-2000:]
    )
    assert "final:" in out.stdout and "succeeded" in out.stdout + out.stderr
    assert (given / "results" / "mlflow.db").exists()  # absolute paths survive the job's cwd

    out = outs["default"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = home / "nfpi-results"
    log = out.stdout + out.stderr
    first = [line for line in log.splitlines() if "results:" in line or "MLflow:" in line]
    assert f"results: {results}" in first[0]
    assert f"mlflow ui --backend-store-uri sqlite:///{results}/mlflow.db" in first[1]
    session = submit.session_dir
    assert session.exists() and results not in (session, *results.parents)
    ray_head.stop()  # the Ray session ends: its folder (and the job's working dir) is gone
    assert not session.exists()
    client = MlflowClient(f"sqlite:///{results}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert "nf_acc" in runs[0].data.metrics
    assert any((results / "runs").glob("*/checkpoints"))


# ------------------------------------------------------------------- mistakes: one clear line
def _closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _cli(main, prog, argv, capsys):
    from nfpi.entry import run_cli

    code = run_cli(main, argv, prog=prog)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("entry", ["sweep", "train"])
def test_ray_entry_points_refuse_mistakes_in_one_line_before_ray(entry, tmp_path, capsys):
    from ray_jobs.sweep import main as sweep_main
    from ray_jobs.train import main as train_main

    main = {"sweep": sweep_main, "train": train_main}[entry]
    file = tmp_path / "a-file"
    file.write_text("x")
    port = _closed_port()
    cases = [
        (["--results-dir", str(file)], "is a file"),
        (["--results-dir", str(tmp_path / "r"), "--address", f"ray://127.0.0.1:{port}"],
         f"cannot reach Ray at ray://127.0.0.1:{port}"),
        (["--results-dir", str(tmp_path / "r"), "--set", "optim.epochs", "10"],
         "--set optim.epochs: write KEY=VALUE with '=', e.g. --set optim.epochs=10"),
    ]  # fmt: skip
    if entry == "sweep":
        cases.append((["--results-dir", str(tmp_path / "r"), "--num-samples", "0"],
                      "--num-samples must be >= 1"))  # fmt: skip
    for argv, expected in cases:
        code, _, err = _cli(main, entry, argv, capsys)
        errors = [line for line in err.splitlines() if f"{entry}: error:" in line]
        assert code == 2 and len(errors) == 1 and expected in errors[0], (argv, err)
        assert "Traceback" not in err


def test_bare_nfpi_prints_its_commands(capsys):
    from nfpi.cli import main

    code, _, err = _cli(main, "python -m nfpi", [], capsys)
    assert code == 2
    assert "{train,config,downstream,figures}" in err and "name a command" in err


def test_help_shows_defaults(capsys):
    from ray_jobs.sweep import main as sweep_main

    with pytest.raises(SystemExit):
        sweep_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: digits)", "(default: 1)", "(default: PACK)", "(default: nfpi)"):
        assert shown in text, shown


def test_config_keys_describe_every_key_from_the_config_classes(capsys):
    from nfpi.cli import describe_keys, main

    rows = describe_keys()
    assert len(rows) > 100 and [r[0] for r in rows if not r[4]] == []
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("optim.epochs "))
    assert "default 10" in out[at] and "training epochs" in out[at + 1]


def test_figures_need_no_shared_data_and_say_what_figure_2_needs(tmp_path, monkeypatch, capsys):
    from nfpi import figures
    from nfpi.cli import main

    # Without the authors' embedding, Figure 1's data is made from the bundled digits (cached).
    monkeypatch.setattr(figures, "shared_golden_path", lambda: None)
    monkeypatch.setenv("NFPI_DATA_CACHE", str(tmp_path / "cache"))
    path = figures.default_golden_path()
    assert path == tmp_path / "cache" / "digits_tsne2d.npz"
    x, y = figures.load_points(path)
    assert x.shape == (1797, 2) and sorted(set(y.tolist())) == list(range(10))
    assert figures.digits_embedding_path() == path  # made once
    code, _, err = _cli(main, "python -m nfpi", ["figures", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--figures 1" in err and "--checkpoint results/digits" in err
    argv = ["figures", "--out", str(tmp_path), "--checkpoint", str(tmp_path / "nope")]
    code, _, err = _cli(main, "python -m nfpi", argv, capsys)
    assert code == 2 and "no checkpoint there" in err
