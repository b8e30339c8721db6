"""A sweep's trials reserve their whole footprint (driver and workers, GPUs counted) and run as
many at once as fit the cluster as it is now (ray_jobs.resources)."""

from ray_jobs.resources import ClusterConcurrency, TrialFootprint, trials_that_fit
from ray_jobs.settings import RaySettings


def _footprint(tmp_path, **kwargs):
    return TrialFootprint.of(RaySettings(results_dir=tmp_path, **kwargs))


def test_two_cpus_run_one_one_worker_trial_at_a_time(tmp_path):
    """The bug: CPUs // workers = 2 trials at once on 2 CPUs, but each also holds its driver's
    0.01 CPU (2.02 > 2): the second Train run waited and timed out every 60 s."""
    footprint = _footprint(tmp_path)
    assert footprint.bundles() == [{"CPU": 0.01}, {"CPU": 1.0}]
    assert trials_that_fit([{"CPU": 2.0}], footprint) == 1
    assert trials_that_fit([{"CPU": 4.0}], footprint) == 3
    assert trials_that_fit([{"CPU": 2.0}], _footprint(tmp_path, cpus_per_worker=0.99)) == 2


def test_gpu_trials_pack_onto_gpu_nodes_and_are_capped(tmp_path):
    footprint = _footprint(tmp_path, num_workers=2, use_gpu=True)
    head = {"CPU": 8.0}  # drivers fit here; workers need a GPU node
    gpu = {"CPU": 8.0, "GPU": 4.0}
    assert trials_that_fit([head], footprint) == 0
    assert trials_that_fit([head, gpu], footprint) == 2
    assert trials_that_fit([head, gpu, gpu], footprint) == 4
    assert trials_that_fit([head, gpu, gpu], footprint, limit=3) == 3
    # A worker's CPU and GPU must be on one node: 4 GPUs on a node with 1 CPU hold 1 worker.
    assert trials_that_fit([head, {"CPU": 1.0, "GPU": 4.0}], footprint) == 0


def test_concurrency_follows_the_cluster_as_it_scales(tmp_path):
    """Recomputed whenever Tune asks for the next trial (autoscaling adds nodes)."""
    nodes = [{"CPU": 2.0}]
    limiter = ClusterConcurrency(_footprint(tmp_path), nodes=lambda: list(nodes), refresh_s=0)
    assert limiter.max_concurrent == 1
    nodes.append({"CPU": 4.0})  # 6 CPUs: 5 x (1 + 0.01), a driver beside another's worker
    assert limiter.max_concurrent == 5
    capped = ClusterConcurrency(_footprint(tmp_path), cap=2, nodes=lambda: list(nodes), refresh_s=0)
    assert capped.max_concurrent == 2
    empty = ClusterConcurrency(_footprint(tmp_path), nodes=lambda: [{"CPU": 0.5}], refresh_s=0)
    assert empty.max_concurrent == 1  # never zero: a pending trial asks the autoscaler for nodes


def test_the_limiter_starts_no_more_trials_than_fit(tmp_path):
    from ray import tune

    nodes = [{"CPU": 2.0}]
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
    assert len(first) == 1  # one at a time on 2 CPUs
    nodes.append({"CPU": 2.0})  # a node joins: 4 CPUs hold 3 x (1 + 0.01)
    assert len(start_all()) == 2
    limiter.on_trial_complete(first[0].trial_id)
    assert len(start_all()) == 1
