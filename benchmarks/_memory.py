"""Peak-memory reading shared by the benchmark scripts (Linux /proc)."""


def vm(field: str) -> float:
    """A /proc/self/status memory field (``VmHWM``, ``VmRSS``...) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")
