"""Anderson mixing: the adaptive damping of the fixed-point solver.

For a fixed-point map G with residual g(u) = G(u) - u, Anderson mixing (type II, "Anderson
acceleration") takes the step

    u_next = u + g - (dU + dG) gamma,      gamma = argmin || W (g - dG gamma) ||_2,

where the columns of dU and dG are the differences of the last ``memory`` iterates and of their
residuals, and W is a fixed diagonal weight (the residual's units). With ``memory`` = 0 it is
the plain iteration u <- G(u). It extrapolates through the period-2 oscillations and the slow
drifts that the plain FPI map shows at large lambda; the caller decides whether to take the
step (a safeguard: keep it only if it lowers the residual) and calls :meth:`reset` when not.

Memory: two ``memory x n`` buffers, preallocated (2 x 5 x 2Kd float64 = 470 MB at K = 1000,
d = 3072); the step forms no other ``memory x n`` temporary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nfpi.errors import ConfigError

__all__ = ["AndersonMixer"]


class AndersonMixer:
    """Anderson mixing with a fixed-size history.

    Args:
        memory: number of past differences combined (>= 1).
        weight: [n] positive weights of the residual's components (1 / scale of each).

    Example:
        >>> a = torch.tensor([[0.5, 0.2], [0.0, 0.5]], dtype=torch.float64)
        >>> g_of = lambda u: a @ u + 1.0 - u            # residual of the affine map u -> A u + 1
        >>> mixer, u = AndersonMixer(2, torch.ones(2, dtype=torch.float64)), torch.zeros(2, dtype=torch.float64)
        >>> for _ in range(4):
        ...     u = mixer.step(u, g_of(u))
        >>> bool(g_of(u).abs().max() < 1e-6)             # exact (up to the ridge) after n + 1 steps
        True
    """

    def __init__(self, memory: int, weight: Tensor) -> None:
        if memory < 1:
            raise ConfigError("anderson_memory", memory, "an int >= 1")
        if weight.ndim != 1 or not bool((weight > 0).all()):
            raise ConfigError("weight", tuple(weight.shape), "a 1-D tensor of positive weights")
        n = weight.numel()
        self.memory, self.weight = memory, weight
        self._du = weight.new_zeros(memory, n)
        self._dg = weight.new_zeros(memory, n)  # weighted residual differences
        self._count = 0
        self._prev: tuple[Tensor, Tensor] | None = None

    @property
    def history(self) -> int:
        """How many differences the next step combines (0 after :meth:`reset`)."""
        return min(self._count, self.memory)

    def reset(self) -> None:
        """Forget the history (a rejected step means the local secant model is stale)."""
        self._count, self._prev = 0, None

    def step(self, u: Tensor, g: Tensor) -> Tensor:
        """The mixed next iterate from the current point ``u`` [n] and its residual ``g`` [n]."""
        gw = g * self.weight
        if self._prev is not None:
            slot = self._count % self.memory
            self._du[slot] = u - self._prev[0]
            self._dg[slot] = gw - self._prev[1]
            self._count += 1
        self._prev = (u, gw)
        used = self.history
        if used == 0:
            return u + g
        du, dg = self._du[:used], self._dg[:used]
        gram = dg @ dg.T
        # A relative ridge keeps the small least-squares system solvable when two residual
        # differences are (nearly) parallel.
        ridge = 1e-10 * float(gram.diagonal().max()) + 1e-300
        eye = torch.eye(used, dtype=gram.dtype, device=gram.device)
        gamma = torch.linalg.solve(gram + ridge * eye, dg @ gw)
        # Two small products instead of materialising (du + dg / w): no [memory, n] temporaries.
        return u + g - gamma @ du - (gamma @ dg) / self.weight
