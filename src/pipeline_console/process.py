"""What a long-running process (serve, worker) does once before it starts its work."""

from __future__ import annotations

import gc


def settle_long_lived_objects() -> int:
    """Move every object alive now out of the cyclic garbage collector's way (gc.freeze):
    the imported modules, the application, its routes, models and validators, which live as
    long as the process. Returns how many were moved.

    Left in, every full collection walked them all: under load in benchmark 3 that was a
    pause of 100-180 ms every few seconds, and the requests of the group being decided
    then were the slowest 1 % (bench/notes/23-http.md). Frozen objects are still freed when
    nothing refers to them; only a reference cycle among them is never collected, which is
    why this belongs in a process's entrypoint, after start-up, and never in a test run."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
