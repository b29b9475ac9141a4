"""What the steps of a delivery share: the Deliverer (everything a delivery needs, passed in
so that tests control time), the claim's lease as the worker sees it, and what passes from
one step to the next (Prepared → Sent → DeliveryResult)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pipeline_console.clock import Clock
from pipeline_console.db import Database
from pipeline_console.delivery.policy import Classification, SendResult
from pipeline_console.delivery.transports import (
    DeliveryRequest,
    SystemConfig,
    Transports,
    total_deadline_s,
)

if TYPE_CHECKING:
    from pipeline_console.delivery.vault import Vault
    from pipeline_console.delivery.workers import Liveness


def boot_clock() -> float:
    """A monotonic clock that also counts time the machine spent suspended (CLOCK_BOOTTIME
    on Linux; time.monotonic elsewhere): a fence must see every second that passed."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


MONOTONIC: Callable[[], float] = (boot_clock if hasattr(time, "CLOCK_BOOTTIME")
                                  else time.monotonic)


@dataclass
class StallWatch:
    """Notices when this process did not run for a while: frozen (SIGSTOP), suspended, or
    starved of CPU. A send that timed out across such a stall timed out because of us (its
    timer kept running while we did not read the answer), not because of the system."""

    monotonic: Callable[[], float] = MONOTONIC
    tick_s: float = 0.25
    threshold_s: float = 1.0
    last: float = field(default_factory=MONOTONIC)
    stalls: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=64))

    async def run(self) -> None:
        self.last = self.monotonic()
        while True:
            await asyncio.sleep(self.tick_s)
            self.check()

    def check(self) -> None:
        now = self.monotonic()
        if now - self.last > self.tick_s + self.threshold_s:
            self.stalls.append((self.last, now))
        self.last = now

    def overlapped(self, start: float, end: float) -> bool:
        """Whether a stall fell within [start, end] (checking first: the stall may be ending
        right now, before the ticker has run)."""
        self.check()
        return any(begin < end and finish > start for begin, finish in self.stalls)


@dataclass
class Deliverer:
    """Everything a delivery needs: passed in, so tests control time and randomness.

    `clock` is the wall clock the database's timestamps use; `monotonic` is the one the
    fence uses (a frozen or suspended process sees it jump, the wall clock can be set back).
    `liveness` is a worker's heartbeat: with it, a claim is also void once the heartbeat
    may have looked lost to another worker (API processes have none: only leases apply).
    `stalls`: with it, a send that timed out while this process stalled is worker_lost."""

    database: Database
    transports: Transports
    clock: Clock
    worker_id: str
    lease_margin_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    lease_safety_s: float = 5.0
    monotonic: Callable[[], float] = MONOTONIC
    liveness: Liveness | None = None
    stalls: StallWatch | None = None
    vault: Vault | None = None  # reads the systems' secrets (None: this process has no key)
    # The machine's clock in Unix seconds, for what a receiver compares with its own clock
    # (the webhook-timestamp of a signed request), whatever `clock` says.
    unix_time: Callable[[], float] = time.time


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD_LETTERED = "dead_lettered"
    AMBIGUOUS = "ambiguous"
    SUPERSEDED = "superseded"
    NOT_CLAIMED = "not_claimed"  # the lease was lost (another process recovered it)
    RELEASED = "released"  # claimed but not sent (stopping, a failing system, the fence)


@dataclass(frozen=True)
class DeliveryResult:
    delivery_id: int
    outcome: Outcome
    attempt_id: int | None = None
    classification: str | None = None


@dataclass(frozen=True)
class Lease:
    """A claim as its holder sees it: valid until `deadline` on the holder's monotonic clock
    (computed conservatively: the clock is read before the transaction that confirmed the
    claim), and only while the holder's heartbeat epoch is still `epoch`."""

    deadline: float
    epoch: int | None = None


def system_config(system: Any, secrets: dict[str, str] | None = None,
                  unreadable: tuple[str, ...] = ()) -> SystemConfig:
    """`secrets`: the system's, in the clear (vault.load_secrets); none for a summary.
    `unreadable`: the slots this process's key could not read."""
    return SystemConfig(system.name, system.transport, system.url, system.status_url,
                        system.timeout_s, system.simulation, system.method or "POST",
                        system.headers or {}, system.auth, system.signing, system.tls,
                        system.body_template, secrets or {}, unreadable)


def needs_secrets(system: Any) -> bool:
    return bool(system.auth or system.signing or (system.tls or {}).get("client_cert"))


@dataclass(frozen=True)
class Prepared:
    """A claimed delivery that is ours to send, with its system's settings and its lease."""

    config: SystemConfig
    request: DeliveryRequest
    overrides: list[dict[str, Any]]
    max_attempts: int
    threshold: int
    backoff: tuple[float, float]
    lease: Lease

    @property
    def delivery_id(self) -> int:
        return self.request.delivery_id

    @property
    def exchange_s(self) -> float:
        """The longest one send may take (the transport's whole deadline)."""
        return total_deadline_s(self.config.timeout_s)


@dataclass(frozen=True)
class Sent:
    """A send's answer and what policy.classify made of it, waiting to be recorded."""

    prepared: Prepared
    started_at: datetime
    result: SendResult
    classification: Classification
    rule: str
    request: DeliveryRequest | None = None  # as sent (signed), when it differs from prepared's

    @property
    def delivery_id(self) -> int:
        return self.prepared.request.delivery_id

    def summary(self) -> dict[str, Any]:
        """The request as the attempt row keeps it."""
        return (self.request or self.prepared.request).summary(self.prepared.config)

