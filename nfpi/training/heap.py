"""Return freed tensor memory to the operating system at once (CPU, glibc).

PyTorch allocates CPU tensors with ``malloc``. glibc serves a block of at least
``M_MMAP_THRESHOLD`` bytes (128 KiB at start) with its own ``mmap`` and unmaps it on ``free``;
but after the first such block is freed it raises that threshold to the block's size (up to
32 MiB), so from then on activation-sized tensors come from the heap, whose freed space the
process keeps. With the invertible backward (:mod:`nfpi.flows.reversible`) the live memory of a
``mef-cifar`` step at batch 64 is ~1.3 GB with the runtime, but the kept heap adds 0.3-0.6 GB to
the resident peak (``benchmarks/README.md``, issue 24). :func:`return_freed_memory` fixes the
threshold (which turns glibc's adjustment off) so that every large tensor is mapped and unmapped
on its own: the resident set then follows the live tensors. The price is the page faults of
fresh mappings (each large tensor's pages are zeroed by the kernel on first touch).

Values are unaffected: only where the allocator places blocks changes. The setting is
process-wide and lasts until the process ends (glibc has no "restore the default").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["return_freed_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


def return_freed_memory(threshold_bytes: int = 128 * 1024) -> bool:
    """Make glibc's ``malloc`` map every block of at least ``threshold_bytes`` separately (and
    give it back on ``free``), and trim the heap's free top above that size. Returns whether
    the setting took effect: ``False`` (and no change) where the C library is not glibc.

    For training with ``optim.invertible_backward`` on the CPU (the benchmark's invertible
    row calls it at the start of its worker).

    Example::

        >>> return_freed_memory()
        True
    """
    if not isinstance(threshold_bytes, int) or not 0 < threshold_bytes <= 32 * 1024 * 1024:
        raise ValueError(
            f"threshold_bytes must be an int in (0, 32 MiB] (glibc's limit), got "
            f"{threshold_bytes!r}"
        )
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
    ok = ok and mallopt(_M_TRIM_THRESHOLD, threshold_bytes) == 1
    logger.debug("malloc: mmap and trim thresholds %d bytes: %s", threshold_bytes, ok)
    return ok
