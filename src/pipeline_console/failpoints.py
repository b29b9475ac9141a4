"""Named points where a test kills this process (SIGKILL) on purpose, to show what a crash
at exactly that point leaves behind. Off unless PIPELINE_CONSOLE_FAILPOINTS is set, as
`name=N[,name=N]`: the process kills itself the Nth time it reaches `name`. A process that
has none set pays one dict lookup per point."""

from __future__ import annotations

import os
import signal

_AT: dict[str, int] = {}
_HITS: dict[str, int] = {}

for _part in os.environ.get("PIPELINE_CONSOLE_FAILPOINTS", "").split(","):
    _name, _, _count = _part.strip().partition("=")
    if _name:
        _AT[_name] = int(_count or 1)


def hit(name: str, times: int = 1) -> None:
    """Reach `name` `times` times (a group of messages reaches a point once per message)."""
    if not _AT or name not in _AT:
        return
    _HITS[name] = _HITS.get(name, 0) + times
    if _HITS[name] >= _AT[name]:
        os.kill(os.getpid(), signal.SIGKILL)
