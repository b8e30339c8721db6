"""The EMA of the flow (ema-pytorch, through its public API), started on demand.

The release starts the EMA after the first FPI solve, from the online weights that produced the
solved prior; for the other priors it runs from the start. Until it starts there is no EMA
model, and evaluation uses the online flow.
"""

from __future__ import annotations

from typing import Any

from ema_pytorch import EMA
from torch import nn

from nfpi.config import EMAConfig

__all__ = ["FlowEMA"]


class FlowEMA:
    """An EMA of ``flow`` that exists once :meth:`start` has run."""

    def __init__(self, flow: nn.Module, config: EMAConfig) -> None:
        self.flow, self.config = flow, config
        self.ema: EMA | None = None

    @property
    def active(self) -> bool:
        return self.ema is not None

    def _new(self) -> EMA:
        c = self.config
        return EMA(
            self.flow,
            beta=c.beta,
            power=c.power,
            update_every=c.update_every,
            update_after_step=c.update_after_step,
            include_online_model=False,
        )

    def start(self) -> None:
        """Start (or restart) the average from the current online weights; nothing when the
        config disables the EMA."""
        if not self.config.enabled:
            return
        self.ema = self._new()
        self.ema.update()  # the first update copies the online weights

    def update(self) -> None:
        if self.ema is not None:
            self.ema.update()

    def model(self) -> nn.Module:
        """The EMA flow once the EMA runs, the online flow before."""
        return self.ema.ema_model if self.ema is not None else self.flow

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.ema is None else self.ema.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            self.ema = None
            return
        self.ema = self._new()
        self.ema.load_state_dict(state)
