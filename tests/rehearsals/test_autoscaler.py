"""cluster.yaml's autoscaling on one machine (``rehearsals/autoscaler.py``): the fake
multi-node config made from cluster.yaml, the syntax of every setup and start command, and the
scale-up / scale-down cycle end to end."""

from pathlib import Path

import pytest
import yaml

from rehearsals.autoscaler import check_commands, fake_config

ROOT = Path(__file__).resolve().parents[2]


def test_fake_config_keeps_the_node_types_and_drops_what_needs_ssh():
    from ray_jobs._ray_compat import fillout_defaults

    cluster = fillout_defaults(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    config = fake_config(cluster, "127.0.0.1:1", max_workers=2, idle_timeout_min=0.1)
    types = config["available_node_types"]
    assert (
        types["gpu_worker"]["resources"]
        == cluster["available_node_types"]["gpu_worker"]["resources"]
    )
    assert types["gpu_worker"]["max_workers"] == 2 and config["max_workers"] == 2
    assert config["head_node_type"] == "ray.head.default" and "head" not in types
    assert config["_head_resources"] == cluster["available_node_types"]["head"]["resources"]
    assert config["provider"]["type"] == "fake_multinode"
    assert config["provider"]["gcs_address"] == "127.0.0.1:1"
    assert config["provider"]["disable_node_updaters"] is True  # no SSH to fake nodes
    assert config["setup_commands"] == [] and config["file_mounts"] == {}


def test_every_cluster_command_parses_and_a_broken_one_is_named():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert check_commands(cluster) == []
    broken = {"setup_commands": ["echo ok", "if true; then echo"]}
    (error,) = check_commands(broken)
    assert error.startswith("setup_commands[1] does not parse")


@pytest.mark.cluster
def test_the_autoscaler_adds_gpu_workers_for_a_spread_run_and_removes_them(tmp_path, run_rehearsal):
    """The whole cycle on Ray's fake multi-node provider: a private head alone, a demand shaped
    like ``--use-gpu --num-workers 2 --placement-strategy SPREAD`` makes the autoscaler launch
    ``gpu_worker`` nodes, one bundle lands on each, and once the demand is gone the idle nodes
    are terminated. In a subprocess: the rehearsal starts and ends its own cluster."""
    report = run_rehearsal("autoscaler.py", tmp_path / "autoscaler.json")
    record = report["record"]
    assert record["workers_before"] == 0 and record["workers_after"] == 0
    assert record["workers_launched"] == 2 == record["max_workers"]
    nodes = [b["node"] for b in record["bundles"]]
    assert len(nodes) == len(set(nodes)) == 2  # SPREAD: one bundle per node
    assert {b["node_type"] for b in record["bundles"]} == {"gpu_worker"}
    assert all(b["gpu_ids"] for b in record["bundles"])  # each bundle holds its (logical) GPU
