"""A sweep's trials reserve their whole footprint (driver and workers, GPUs counted) and run as
many at once as fit the cluster as it is now (ray_jobs.resources)."""

from ray_jobs.resources import DRIVER_MEMORY, ClusterConcurrency, TrialFootprint, trials_that_fit
from ray_jobs.settings import RaySettings


def _footprint(tmp_path, **kwargs):
    return TrialFootprint.of(RaySettings(results_dir=tmp_path, **kwargs))


GB = 1024.0**3


def _node(cpus, gpus=0.0, memory=8 * GB):
    return {"CPU": float(cpus), "memory": memory, **({"GPU": float(gpus)} if gpus else {})}


def test_two_cpus_run_two_one_worker_trials_at_once(tmp_path):
    """First bug: CPUs // workers = 2 trials at once on 2 CPUs, but each also held its driver's
    0.01 CPU (2.02 > 2): the second Train run waited and timed out every 60 s. The fix counted
    the driver, which then ran one trial at a time on 2 cores with one core idle. The driver
    sleeps in fit(): it reserves memory, not CPU, and two 1-worker trials fit on 2 CPUs."""
    footprint = _footprint(tmp_path)
    assert footprint.bundles() == [{"memory": DRIVER_MEMORY}, {"CPU": 1.0}]
    assert trials_that_fit([_node(2)], footprint) == 2
    assert trials_that_fit([_node(4)], footprint) == 4
    assert trials_that_fit([_node(3)], _footprint(tmp_path, num_workers=2)) == 1
    # Memory counts: a node without room for a driver runs none there.
    assert trials_that_fit([_node(2, memory=DRIVER_MEMORY)], footprint) == 1
    assert "driver (256 MiB memory)" in footprint.describe()


def test_gpu_trials_pack_onto_gpu_nodes_and_are_capped(tmp_path):
    footprint = _footprint(tmp_path, num_workers=2, use_gpu=True)
    head = _node(8)  # drivers fit here; workers need a GPU node
    gpu = _node(8, gpus=4)
    assert trials_that_fit([head], footprint) == 0
    assert trials_that_fit([head, gpu], footprint) == 2
    assert trials_that_fit([head, gpu, gpu], footprint) == 4
    assert trials_that_fit([head, gpu, gpu], footprint, limit=3) == 3
    # A worker's CPU and GPU must be on one node: 4 GPUs on a node with 1 CPU hold 1 worker.
    assert trials_that_fit([head, _node(1, gpus=4)], footprint) == 0


def test_concurrency_follows_the_cluster_as_it_scales(tmp_path):
    """Recomputed whenever Tune asks for the next trial (autoscaling adds nodes)."""
    nodes = [_node(1)]
    limiter = ClusterConcurrency(_footprint(tmp_path), nodes=lambda: list(nodes), refresh_s=0)
    assert limiter.max_concurrent == 1
    nodes.append(_node(4))  # 5 CPUs: 5 one-worker trials
    assert limiter.max_concurrent == 5
    capped = ClusterConcurrency(_footprint(tmp_path), cap=2, nodes=lambda: list(nodes), refresh_s=0)
    assert capped.max_concurrent == 2
    empty = ClusterConcurrency(_footprint(tmp_path), nodes=lambda: [_node(0.5)], refresh_s=0)
    assert empty.max_concurrent == 1  # never zero: a pending trial asks the autoscaler for nodes


def test_the_limiter_starts_no_more_trials_than_fit(tmp_path):
    from ray import tune

    nodes = [_node(1)]
    limiter = ClusterConcurrency(_footprint(tmp_path), nodes=lambda: list(nodes), refresh_s=0)
    tune.register_trainable("nfpi_noop", lambda config: None)
    grid = {"x": tune.grid_search([1, 2, 3, 4, 5])}
    limiter.add_configurations({"exp": {"run": "nfpi_noop", "config": grid}})

    def start_all() -> list:
        started = []
        while (trial := limiter.next_trial()) is not None:
            started.append(trial)
        return started

    first = start_all()
    assert len(first) == 1  # one at a time on 1 CPU
    nodes.append(_node(2))  # a node joins: 3 CPUs hold 3 one-worker trials
    assert len(start_all()) == 2
    limiter.on_trial_complete(first[0].trial_id)
    assert len(start_all()) == 1
