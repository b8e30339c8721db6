"""The device choice, written once: the flow's training loop, the downstream classifier and the
command lines all turn a config's ``device`` into a :class:`torch.device` here."""

from __future__ import annotations

import os

import torch

from nfpi.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when visible, else cpu; a CUDA rank gets its ``LOCAL_RANK``'s device.

    Raises:
        ConfigError: ``cuda`` asked for where no CUDA device is visible.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "'cpu' or 'auto': no CUDA device is visible")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    return torch.device(name)
