"""The invertible-layer contract, the layer registry and explicit data-dependent initialisation.

Every layer maps data to latent in ``forward`` and back in ``inverse``; both return the
log-absolute-determinant of the Jacobian of *that* direction, one value per sample::

    y, logdet = layer(x)          # logdet = log |det dy/dx|, shape (B,)
    x2, logdet_inv = layer.inverse(y)
    # x2 == x and logdet_inv == -logdet (up to round-off)

Data-dependent initialisation (ActNorm, the per-channel affine of the coupling nets) is an
explicit, saved step: each such module carries a persistent bool buffer ``initialized`` and is
set by :func:`data_init` from one batch, deterministically (so that every data-parallel rank that
runs it on the same batch gets identical weights). Running it a second time raises
:class:`DataInitError`: a resumed checkpoint is never silently re-initialised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from nfpi.errors import NfpiError, ShapeError

__all__ = [
    "Compose",
    "DataInitError",
    "DataInitModule",
    "InvertibleLayer",
    "data_init",
    "register_layer",
    "registered_layers",
]

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type[InvertibleLayer]] = {}

T = TypeVar("T", bound="InvertibleLayer")


class DataInitError(NfpiError, RuntimeError):
    """Data-dependent initialisation was requested on a model whose layers are (partly) set
    already, e.g. after loading a checkpoint, or it could not reach every layer."""


def register_layer(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register an :class:`InvertibleLayer` subclass under ``name``.

    Example::

        @register_layer("identity")
        class Identity(InvertibleLayer):
            def forward(self, x):
                return x, x.new_zeros(x.shape[0])

            def inverse(self, y):
                return y, y.new_zeros(y.shape[0])
    """

    def decorator(cls: type[T]) -> type[T]:
        if not (isinstance(cls, type) and issubclass(cls, InvertibleLayer)):
            raise TypeError(
                f"@register_layer({name!r}) expects an InvertibleLayer subclass, got {cls!r}"
            )
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"layer name {name!r} is already registered to {_REGISTRY[name].__qualname__}; "
                "choose another name"
            )
        _REGISTRY[name] = cls
        cls.layer_name = name
        return cls

    return decorator


def registered_layers() -> dict[str, type[InvertibleLayer]]:
    """A copy of the registry: layer name -> class."""
    return dict(_REGISTRY)


class InvertibleLayer(nn.Module):
    """Base class of every bijection in :mod:`nfpi.flows`.

    Subclasses implement

    * ``forward(x) -> (y, logdet)``: data -> latent, ``logdet = log|det(dy/dx)|`` of shape (B,);
    * ``inverse(y) -> (x, logdet)``: latent -> data, ``logdet = log|det(dx/dy)|`` (= minus the
      forward log-det at the matching point), shape (B,).

    The batch dimension is always the first one; samples never interact (the log-det of one sample
    does not depend on the rest of the batch). Shapes may change (e.g. :class:`Squeeze`), but
    ``inverse`` restores the input shape.
    """

    layer_name: str = ""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def data_init(self, x: Tensor) -> None:
        """Initialise every data-dependent module inside this layer from batch ``x``
        (see :func:`data_init`)."""
        data_init(self, x)


class DataInitModule(nn.Module):
    """Mixin for modules with data-dependent initialisation.

    Subclasses call :meth:`_setup_data_init` in ``__init__``, implement :meth:`_init_from_batch`
    (no autograd, sets parameters from the module's input) and call :meth:`_maybe_data_init` with
    their input at the top of ``forward``. The flag that triggers initialisation is a plain Python
    attribute, so the steady-state cost is one attribute test (no host synchronisation).
    """

    initialized: Tensor

    def _setup_data_init(self) -> None:
        self.register_buffer("initialized", torch.tensor(False), persistent=True)
        self._init_pending = False

    def _init_from_batch(self, x: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _maybe_data_init(self, x: Tensor) -> None:
        if self._init_pending:
            with torch.no_grad():
                self._init_from_batch(x)
                self.initialized.fill_(True)
            self._init_pending = False


def _data_init_modules(module: nn.Module) -> list[tuple[str, DataInitModule]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, DataInitModule)]


def data_init(module: nn.Module, *inputs: Any) -> None:
    """Data-dependent initialisation of every :class:`DataInitModule` inside ``module``.

    Runs one forward pass of ``module(*inputs)`` without autograd; each data-initialised layer
    sets its parameters from the activations it receives (zero mean and unit standard deviation of
    its output, or a zero output scale where the layer asks for it) and sets its ``initialized``
    buffer. Deterministic given the batch.

    Raises:
        DataInitError: some layer is initialised already (e.g. a checkpoint was loaded: resume
            training without calling this), or the pass did not reach every such layer.
    """
    targets = _data_init_modules(module)
    done = [name or "<root>" for name, m in targets if bool(m.initialized)]
    if done:
        raise DataInitError(
            f"data_init called on a model whose data-dependent layers are already initialised "
            f"({len(done)} of {len(targets)}, e.g. {done[:3]}); it would overwrite trained or "
            "loaded weights. Call data_init exactly once, on a freshly built model, before "
            "training; after loading a checkpoint, skip it."
        )
    # All or nothing: a failure half-way (e.g. a batch too small for a statistic) restores the
    # previous weights instead of leaving some layers marked initialised.
    backup = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for _, m in targets:
        m._init_pending = True
    try:
        with torch.no_grad():
            module(*inputs)
        missed = [name or "<root>" for name, m in targets if m._init_pending]
        if missed:
            raise DataInitError(f"data_init's forward pass did not reach the layers {missed}")
    except BaseException:
        module.load_state_dict(backup)
        raise
    finally:
        for _, m in targets:
            m._init_pending = False
    logger.debug("data_init set %d layers from a batch of %d", len(targets), len(inputs[0]))


def check_image(
    x: Tensor, shape: tuple[int, ...] | None, where: str, channels: int | None = None
) -> None:
    """Raise :class:`ShapeError` unless ``x`` is [B, C, H, W] with (C, H, W) == ``shape``
    (if given) and C == ``channels`` (if given)."""
    bad = x.ndim != 4 or (shape is not None and tuple(x.shape[1:]) != tuple(shape))
    if bad or (channels is not None and x.shape[1] != channels):
        if shape is not None:
            want = f"[B, {shape[0]}, {shape[1]}, {shape[2]}]"
        else:
            want = "[B, C, H, W]" if channels is None else f"[B, {channels}, H, W]"
        raise ShapeError(f"{where} expects a batch of shape {want}, got {tuple(x.shape)}")


@register_layer("compose")
class Compose(InvertibleLayer):
    """Composition ``f_n o ... o f_1``: forward runs the layers in order, inverse in reverse;
    log-dets add up (chain rule)."""

    def __init__(self, layers: Iterable[InvertibleLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        for layer in self.layers:
            if not isinstance(layer, InvertibleLayer):
                raise TypeError(
                    f"Compose takes InvertibleLayer instances, got {type(layer).__name__}"
                )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        logdet = y.new_zeros(y.shape[0])
        for layer in reversed(self.layers):
            y, ld = layer.inverse(y)
            logdet = logdet + ld
        return y, logdet
