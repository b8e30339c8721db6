"""Pretrain, then fine-tune: start a run's flow from another run's flow weights.

``flow.init_from`` names a run directory or checkpoint (anything
:func:`nfpi.checkpoint.find_checkpoint` takes). A fresh run then loads that checkpoint's flow
weights instead of data-initialising its flow, and initialises its prior from the loaded flow's
class statistics on its own training data, one gaussian per class of its own dataset: the
pretraining run's prior (e.g. 1000 ImageNet classes) is not used. That is the release's path
(``nf_weights_load_path``: the online flow's weights are loaded, EMA and gaussians left out,
then ``run_gaussian_training_init`` on the new data).

Only the flow's weights are read (``weights_only=True``, :func:`nfpi.checkpoint.load_checkpoint`);
the optimiser, EMA, schedule and history start afresh. The architectures must match key for key
and shape for shape (same ``flow.*`` settings and image size); anything else is one
:class:`~nfpi.errors.CheckpointError` naming the keys.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from nfpi.checkpoint import load_checkpoint
from nfpi.errors import CheckpointError

__all__ = ["load_pretrained_flow"]

log = logging.getLogger(__name__)


def _few(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_pretrained_flow(
    flow: nn.Module, path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Path, int]:
    """Copy the flow weights of the checkpoint at ``path`` into ``flow`` (bit for bit).

    Returns:
        (the checkpoint file read, the number of epochs it had trained).

    Raises:
        CheckpointError: no readable checkpoint at ``path``, or its flow does not fit ``flow``
            (missing, unexpected or differently shaped keys, named in the message).
    """
    state = load_checkpoint(path, map_location=device)
    file = Path(state["_file"])
    saved: dict[str, torch.Tensor] = state["flow"]
    mine = flow.state_dict()
    missing = [k for k in mine if k not in saved]
    unexpected = [k for k in saved if k not in mine]
    shapes = [
        f"{k} {tuple(saved[k].shape)} saved, {tuple(v.shape)} here"
        for k, v in mine.items()
        if k in saved and saved[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        pre = state["config"].get("flow", {})
        shape = state.get("data_info", {}).get("shape")
        problems = [
            f"{len(missing)} keys missing ({_few(missing)})" if missing else "",
            f"{len(unexpected)} unexpected ({_few(unexpected)})" if unexpected else "",
            f"{len(shapes)} of another shape ({_few(shapes)})" if shapes else "",
        ]
        raise CheckpointError(
            f"flow.init_from={path}: the flow in {file} (flow.preset={pre.get('preset')!r}, "
            f"images {tuple(shape) if shape else '?'}) does not fit this run's flow: "
            f"{'; '.join(p for p in problems if p)}. Fine-tune with the pretraining run's "
            "flow.* settings and image size (data.image_size)"
        )
    flow.load_state_dict(saved)
    epoch = int(state["epoch"])
    log.debug("loaded %d flow tensors from %s (epoch %d)", len(saved), file, epoch)
    return file, epoch
