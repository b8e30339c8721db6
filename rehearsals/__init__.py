"""Rehearsals: scripts that show the Ray service working at a shape one machine can stand in
for, not the service itself (which is ``ray_jobs/``). Each is run as a script and is also
imported by its test (the Ray workers it starts import it by name, hence a package):

- ``python rehearsals/multinode.py``: two Ray nodes, a run spread over them, then one lost.
- ``python rehearsals/autoscaler.py``: cluster.yaml's autoscaling with Ray's fake provider.
- ``python rehearsals/imagenet.py``: ImageNet's shape at toy size (K = 1000, d = 3072).

Each writes its checks to ``--out`` (JSON) and exits 1 if one fails, naming it; the multi-node
and ImageNet rehearsals take ``--smoke-test`` (what the suite runs).
"""
