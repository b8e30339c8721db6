"""cluster.yaml validates against Ray's autoscaler schema offline and keeps its promises."""

import re
from pathlib import Path

import pytest
import yaml

from ray_jobs._ray_compat import fillout_defaults, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER.read_text())


def test_validates_offline_with_rays_schema(cluster):
    filled = fillout_defaults(cluster)
    validate_config(filled)  # raises on any schema violation
    broken = {**cluster, "max_workers": "many"}
    with pytest.raises(Exception, match="many"):
        validate_config(fillout_defaults(broken))


def test_head_runs_ray_and_mlflow_and_a_gpu_worker_type_exists(cluster):
    head = "\n".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in head and "mlflow server" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "--artifacts-destination /mnt/shared/" in head  # artifacts on the shared file system
    gpu = [n for n in cluster["available_node_types"].values() if n["resources"].get("GPU", 0) >= 1]
    assert (
        gpu
        and cluster["available_node_types"][cluster["head_node_type"]]["resources"].get("GPU", 0)
        == 0
    )


def test_setup_installs_the_project_on_shared_storage(cluster):
    setup = "\n".join(cluster["setup_commands"])
    assert "pip install" in setup and "-e ~/nfpi" in setup and "mount" in setup
    assert "." in cluster["file_mounts"].values()


def test_nothing_public_and_no_credentials(cluster):
    text = CLUSTER.read_text()
    assert "0.0.0.0/0" not in text and "--dashboard-host=0.0.0.0" not in text
    for secret in ("aws_access_key", "aws_secret", "AKIA", "token:"):
        assert secret.lower() not in text.lower()
    # Passwords and keys are read at run time from files or commands ("$(cat ...)"), never
    # written here.
    assignments = re.findall(r"(?i)((?:password|secret_key)\w*)\s*[=:]\s*(\S+)", text)
    assert assignments and all(v.startswith(('"$(', "$(")) for _, v in assignments), assignments
    assert cluster["provider"]["use_internal_ips"] is True
    for perm in cluster["provider"]["security_group"]["IpPermissions"]:
        for rng in perm["IpRanges"]:
            assert not rng["CidrIp"].startswith("0.0.0.0")


def test_ray_uses_token_auth_with_the_token_from_a_secret(cluster):
    """Before: the head and the workers ran Ray with token authentication off. Now every
    `ray start`/`ray stop` runs with RAY_AUTH_MODE=token and each node reads the token from
    AWS Secrets Manager into a private file; no token is written in cluster.yaml."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in cluster[key]:
            if "ray start" in command or "ray stop" in command:
                assert "RAY_AUTH_MODE=token" in command, command
    setup = "\n".join(cluster["setup_commands"])
    assert "aws secretsmanager get-secret-value" in setup and "~/.ray/auth_token" in setup
    assert "umask 077" in setup
    text = CLUSTER.read_text()
    assert "RAY_AUTH_MODE=disabled" not in text
    assert not re.search(r"RAY_AUTH_TOKEN=[\"']?[0-9a-fA-F]{16,}", text)  # no literal token


def test_mlflow_store_is_off_the_network_file_system(cluster):
    """Before: the tracking server's SQLite database lived on EFS (NFS), where SQLite's locking
    is unreliable, and a job without MLFLOW_TRACKING_URI wrote that same file from every node.
    Now the database is on the head's local disk (or Postgres) and every Ray process is given the
    server's URI."""
    head = "\n".join(cluster["head_start_ray_commands"])
    store = re.search(r"--backend-store-uri (\S+)", head).group(1)
    assert store.startswith(("sqlite:////home/", "postgresql://")), store
    assert "/mnt/shared" not in store
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cluster[key] if "ray start" in c)
        assert "MLFLOW_TRACKING_URI=http://" in start and ":5000" in start, start


def test_mlflow_server_needs_credentials_and_jobs_write_to_shared_storage(cluster):
    """MLflow's basic-auth app on the head (no access without an account; the admin's secret
    from Secrets Manager, given to every Ray process as its client credentials), and
    NFPI_RESULTS on shared storage for every Ray process: a job with no --results-dir keeps its
    results there."""
    head = "\n".join(cluster["head_start_ray_commands"])
    assert "mlflow server --app-name basic-auth" in head
    assert "default_permission = NO_PERMISSIONS" in head
    setup = "\n".join(cluster["setup_commands"])
    assert "--secret-id nfpi/mlflow-admin" in setup and "umask 077" in setup
    assert "[cluster]" in setup  # mlflow[auth]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cluster[key] if "ray start" in c)
        assert "NFPI_RESULTS=/mnt/shared/" in start, start
        assert 'MLFLOW_TRACKING_PASSWORD="$(cat ~/.mlflow_admin)"' in start, start
