"""Limits shared by every worker on every machine: a system's max_in_flight (sends at once)
and max_per_second, and the pause a 429 or 503 with Retry-After asks for (throttled_until,
set when the answer is recorded: recording.py). They are kept in the claim, through the
database (claims.claim_due_rows, claims.claim_in): a worker never claims beyond them, so it
never holds a claim it may not send.

- max_in_flight: the claim locks the system's row (FOR UPDATE on PostgreSQL; SQLite has one
  writer), counts the system's in-flight deliveries and claims at most the difference. A
  claim held but not yet sent counts: a worker's queue is part of what it may send at once.
- max_per_second: a token bucket in the same row (rate_allowance tokens as of
  rate_checked_at), refilled at max_per_second up to policy.rate_burst; a claim takes at most
  the whole tokens there are, and spends them.
- throttled_until: while it is in the future, no claim takes the system's deliveries.

A system with none of them costs nothing: its limits come with the circuits the claim reads
anyway, nothing is locked and nothing more is asked.

The clocks are the workers' wall clocks, like the leases' (kept in step by NTP); the bucket's
time stamp never moves backwards, so a machine whose clock is behind adds no tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.delivery.policy import rate_burst, refill
from pipeline_console.models import Delivery, DownstreamSystem

_deliveries = Delivery.__table__
_systems = DownstreamSystem.__table__

# How soon a worker looks again at a system held back by max_in_flight alone: a slot is
# freed when a send's outcome is recorded, which the worker that sent it sees at once (it
# claims again after recording); the others find out this often.
IN_FLIGHT_RECHECK_S = 0.25
LIMIT_COLUMNS = (_systems.c.max_in_flight, _systems.c.max_per_second,
                 _systems.c.throttled_until)


@dataclass(frozen=True)
class Limits:
    max_in_flight: int | None
    max_per_second: float | None
    throttled_until: datetime | None

    @classmethod
    def of(cls, row: Any) -> Limits:
        return cls(row.max_in_flight, row.max_per_second, row.throttled_until)

    @property
    def limited(self) -> bool:
        return self.max_in_flight is not None or self.max_per_second is not None

    def throttled(self, now: datetime) -> bool:
        return self.throttled_until is not None and self.throttled_until > now


@dataclass
class ClaimNotes:
    """What a claim saw of the limits, for the worker's timing: the systems throttled now
    (until when), the systems held back by max_in_flight, and how soon (seconds) a system
    held back by a limit or a throttle may have room again."""

    throttled: dict[str, datetime] = field(default_factory=dict)
    full: set[str] = field(default_factory=set)
    retry_in_s: float | None = None

    def retry_in(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.retry_in_s = seconds if self.retry_in_s is None else min(self.retry_in_s, seconds)


@dataclass
class Allowance:
    """What a claim may take of one limited system now."""

    name: str
    count: int
    room: int | None  # max_in_flight minus the sends under way (None: no max_in_flight)
    tokens: float | None  # the bucket, refilled (None: no max_per_second)
    checked_at: datetime | None
    per_second: float | None


async def allowances(session: AsyncSession, names: list[str], now: datetime, *,
                     at_most: dict[str, int]) -> dict[str, Allowance]:
    """Lock the limited systems' rows (by name) and work out how many claims each may
    have now: at most `at_most[name]`, max_in_flight minus its in-flight deliveries, and the
    whole tokens of its bucket."""
    if not names:
        return {}
    names = sorted(names)
    rows = (await session.execute(
        select(_systems.c.name, _systems.c.max_in_flight, _systems.c.max_per_second,
               _systems.c.rate_allowance, _systems.c.rate_checked_at)
        .where(_systems.c.name.in_(names)).order_by(_systems.c.name)
        .with_for_update())).all()
    counted = [row.name for row in rows if row.max_in_flight is not None]
    in_flight = dict((await session.execute(
        select(_deliveries.c.system, func.count())
        .where(_deliveries.c.system.in_(counted), _deliveries.c.status == "in_flight")
        .group_by(_deliveries.c.system))).all()) if counted else {}
    out = {}
    for row in rows:
        count, room, tokens = at_most[row.name], None, None
        if row.max_in_flight is not None:
            room = max(row.max_in_flight - in_flight.get(row.name, 0), 0)
            count = min(count, room)
        if row.max_per_second is not None:
            elapsed = ((now - row.rate_checked_at).total_seconds()
                       if row.rate_checked_at is not None else 0.0)
            tokens = refill(row.rate_allowance, elapsed, row.max_per_second)
            count = min(count, max(math.floor(tokens), 0))
        out[row.name] = Allowance(row.name, count, room, tokens, row.rate_checked_at,
                                  row.max_per_second)
    return out


def note_held_back(notes: ClaimNotes, allowance: Allowance, claimed: int,
                   wanted: int) -> None:
    """Tell the worker when to look again at a system whose limit left work behind (it
    was allowed fewer than the `wanted`, and claimed them all): for max_per_second, when
    its bucket is half full again (claims then keep ahead of the refill, so the bucket never
    overflows and a claim a little late loses no token); for max_in_flight,
    IN_FLIGHT_RECHECK_S."""
    if allowance.count >= wanted or claimed < allowance.count:
        return
    if allowance.room is not None and allowance.room <= allowance.count:
        notes.full.add(allowance.name)
        notes.retry_in(IN_FLIGHT_RECHECK_S)
    if allowance.tokens is not None and allowance.per_second is not None and math.floor(
            allowance.tokens) <= allowance.count:
        left = allowance.tokens - claimed
        target = max(min(rate_burst(allowance.per_second), wanted) / 2, 1.0)
        notes.retry_in((target - left) / allowance.per_second)


async def spend(session: AsyncSession, allowance: Allowance, claimed: int,
                now: datetime) -> None:
    """Take `claimed` tokens from the bucket (it may go below zero: an operator's send is
    not refused for tokens the workers took a moment ago, and the debt is repaid by the
    refill before the workers claim again)."""
    if allowance.tokens is None:
        return
    checked = now if allowance.checked_at is None else max(allowance.checked_at, now)
    await session.execute(update(_systems).where(_systems.c.name == allowance.name)
                          .values(rate_allowance=allowance.tokens - claimed,
                                  rate_checked_at=checked))
