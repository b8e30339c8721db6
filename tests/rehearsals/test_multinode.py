"""Two Ray nodes on one machine (``rehearsals/multinode.py``): Train workers spread over
a head and a worker node, the prior actor and driver on the head, then the worker node removed
mid-run; every run ends bit-identical to the one-node run.

The rehearsal starts its own Ray cluster, so it runs in a subprocess: the suite's session Ray
(``ray_session``) is left alone and nothing of the cluster outlives the test.
"""

import pytest
import torch
from mlflow.tracking import MlflowClient

from nfpi.checkpoint import find_checkpoint, load_checkpoint
from rehearsals.multinode import diff_states


def test_diff_states_sees_one_ulp_a_dtype_and_a_missing_key_but_not_timings():
    x = torch.linspace(0, 1, 5, dtype=torch.float64)
    state = {
        "flow": {"w": x},
        "history": [{"nf_acc": 0.5, "epoch_seconds": 1.0, "time_train_s": 0.5}],
        "_file": "a",
    }
    same = {
        "flow": {"w": x.clone()},
        "history": [{"nf_acc": 0.5, "epoch_seconds": 9.0, "time_train_s": 4.0}],
    }
    assert diff_states(state, {**same, "_file": "b"}) == []
    bumped = x.clone()
    bumped[3] = torch.nextafter(bumped[3], torch.tensor(2.0, dtype=torch.float64))
    assert diff_states(state, {**same, "flow": {"w": bumped}}) == [".flow.w"]
    assert diff_states(state, {**same, "flow": {"w": x.float()}}) == [".flow.w"]
    assert diff_states(state, {"flow": {"w": x}}) == [".history"]
    history = [{"nf_acc": 0.25, "epoch_seconds": 1.0}]
    assert diff_states(state, {**same, "history": history}) == [".history[0].nf_acc"]


@pytest.mark.cluster
@pytest.mark.slow
def test_two_nodes_then_a_lost_node_end_bit_identical_to_one_node(tmp_path, run_rehearsal):
    results = tmp_path / "results"
    # 2 epochs, the node lost at the end of the first: the least that still resumes mid-run.
    report = run_rehearsal(
        "multinode.py", tmp_path / "rehearsal.json", "--smoke-test", "--epochs", "2",
        "--kill-epoch", "0", "--results-dir", str(results),
    )  # fmt: skip
    one, two, loss = report["records"]
    # Placement: PACK on one node, SPREAD on both; after the loss, the group is on the head.
    assert len(one["nodes_per_attempt"]) == 1 and len(one["nodes_per_attempt"][0]) == 1
    assert two["nodes_per_attempt"] == [["head", "worker"]]
    assert loss["nodes_per_attempt"] == [["head", "worker"], ["head"]]
    assert len(loss["ranks_on_worker_node"]) == 1  # the rank that died with its node
    assert loss["resumed_from"][0].endswith("runs/node-loss/checkpoints/epoch-0001/state.pt")
    for record in (one, two, loss):
        assert record["actor_nodes"] == ["head"] and record["epochs"] == 2
    # Bit-identical final states and statistics, re-checked here from the files.
    reference = load_checkpoint(find_checkpoint(results / "runs" / "one-node"))
    stats = torch.load(results / "probes" / "one-node" / "statistics.pt", weights_only=True)
    for name in ("two-node", "node-loss"):
        state = load_checkpoint(find_checkpoint(results / "runs" / name))
        assert diff_states(state, reference) == [], name
        assert torch.equal(
            torch.load(results / "probes" / name / "statistics.pt", weights_only=True), stats
        ), name
    assert len(reference["history"]) == 2 and stats.dtype == torch.float64
    # MLflow (the SQLite store every node wrote to): each epoch logged once per run.
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("nfpi-multinode").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["node-loss", "one-node", "two-node"]
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("train_bpd", "test_bpd", "nf_acc"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == [0, 1], (run.info.run_name, key, steps)
