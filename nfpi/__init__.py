"""nfpi: class-conditional normalizing flows with fixed-point-iteration gaussian priors.

The library is pure PyTorch: ``nfpi.prior`` (class statistics, the gaussian prior, FPI and GD
solvers), ``nfpi.flows`` (invertible layers and multi-scale flows), ``nfpi.data`` (datasets,
augmentation, dequantisation). It imports neither Ray nor MLflow; ``ray_jobs/`` wires those in.
"""

__version__ = "0.1.0"
