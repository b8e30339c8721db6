"""Secure by default: MLflow's SQLite store never on a network file system (cluster.yaml's token
authentication and tracking server are checked in tests/ray_jobs/test_cluster_config.py)."""

import pytest

from nfpi.errors import ConfigError
from ray_jobs import tracking as tracking_module
from ray_jobs.tracking import filesystem_of, resolve_tracking


@pytest.fixture
def mounts(tmp_path, monkeypatch):
    """A fake /proc/mounts: ``tmp_path/<name>`` mounted with the file system type given."""

    def mount(**types):
        lines = ["/dev/root / ext4 rw 0 0"]
        for name, fstype in types.items():
            point = tmp_path / name.replace("_", " ")
            point.mkdir()
            lines.append(f"srv:/x {str(point).replace(' ', chr(92) + '040')} {fstype} rw 0 0")
        (tmp_path / "mounts").write_text("\n".join(lines) + "\n")
        monkeypatch.setattr(tracking_module, "MOUNTS", tmp_path / "mounts")

    return mount


@pytest.mark.parametrize("fstype", ["nfs4", "nfs", "cifs", "smb3", "fuse.sshfs", "fuse.s3fs"])
def test_sqlite_store_on_a_network_file_system_is_refused(tmp_path, mounts, fstype):
    """Before: ``--results-dir`` (or a sqlite: URI) on EFS/NFS put MLflow's SQLite file there,
    where its locking is unreliable, and every node's writers shared it."""
    mounts(shared=fstype)
    results = tmp_path / "shared" / "nfpi"  # not created yet: its mount decides
    with pytest.raises(ConfigError, match=f"is on a {fstype} network filesystem") as err:
        resolve_tracking(results, None, "nfpi")
    assert "tracking server" in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    with pytest.raises(ConfigError, match="tracking_uri"):
        resolve_tracking(tmp_path / "local", uri, "nfpi")


def test_local_sqlite_and_tracking_servers_are_accepted(tmp_path, mounts):
    mounts(shared="nfs4", overlay="fuse.fuse-overlayfs", with_blank="ext4")
    local = resolve_tracking(tmp_path / "results", None, "nfpi")
    assert local.uri == f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    rootless = resolve_tracking(tmp_path / "overlay" / "r", None, "nfpi")  # a local FUSE
    assert rootless.uri.startswith("sqlite:///")
    assert filesystem_of(tmp_path / "with blank" / "x") == ("ext4", str(tmp_path / "with blank"))
    # A server keeps its database where it likes: results on NFS are fine then.
    server = resolve_tracking(tmp_path / "shared", "http://10.0.0.5:5000", "nfpi")
    assert server.uri == "http://10.0.0.5:5000" and server.artifact_root is None


def test_filesystem_of_real_paths():
    fstype, point = filesystem_of("/")
    assert point == "/" and fstype  # this machine's root, from the real /proc/mounts
