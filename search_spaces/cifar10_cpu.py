"""Real CIFAR-10 on CPU through the service: data-init, GD and FPI priors at equal objective and
equal budget (the ``cifar10_cpu`` experiment: 16 x 16, glow-small width 32, 8 epochs, the prior
re-solved every epoch); pass ``--set data.root=/abs/path/cifar10-jpeg.tar.gz``. About 20-45
minutes per trial on one core; ``benchmarks/cifar10_cpu.py`` runs the same three without Ray."""

from search_spaces import prior_comparison

SPACE = prior_comparison(
    "cifar10_cpu",
    "Table 1's comparison (data-init vs GD vs FPI) on real CIFAR-10 at a CPU budget",
    "cifar10_cpu",
)
