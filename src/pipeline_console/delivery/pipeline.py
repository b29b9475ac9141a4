"""The worker's delivery pipeline: up to `concurrency` sends in flight at all times.

A pass of claim → send all → record (deliver_many) waits for its slowest send before it
claims again: one answer after a second holds up every slot (head-of-line blocking). Here
the three steps overlap instead. A claim transaction (of up to a batch) runs whenever a
batch fits behind the slots, or a slot is free that nothing waiting may take; each finished
send frees its slot at once for the next claim in the queue; finished sends are recorded a
batch at a time (or RECORD_WAIT_S after the first of them), while the others are still on
the wire. Every claim still goes through the same steps as deliver_many (prepare_batch, the
fence, send, record_sent, release_unsent); only their timing differs.

Fairness: while more than one system is active here (claims waiting or in flight, or
claimed in the last ACTIVE_S), one system holds at most `share_of` the slots (all but a
quarter, at least one fewer than all) and claims at most that share of the two batches that
may wait; a free slot goes to the system with the fewest sends in flight, ties in turn. So a
slow or backlogged system cannot take every slot. A system that becomes active while
another, alone until then, holds every slot waits for one of those sends to end. With a
concurrency of 1 there is nothing to share.

Limits (limits.py): the claims never exceed a system's max_in_flight or max_per_second, and
the claim says when a system it held back may have room again, so the next claim comes
then (not a whole poll interval later, and not at once either). A system that throttled us
(429 or 503 with Retry-After, seen in our own answers or in a claim) gets no sends until
then: the claims of it that wait here are released unsent. Throttling is back-pressure,
not failure: it does not count toward the failures that stop a system's claims here.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.db import unavailability
from pipeline_console.delivery.base import Deliverer, DeliveryResult, Prepared, Sent
from pipeline_console.delivery.claims import claim_due_rows, may_send, release_unsent
from pipeline_console.delivery.limits import ClaimNotes
from pipeline_console.delivery.policy import CircuitEvent, breaker_event, throttle_s
from pipeline_console.delivery.recording import record_sent
from pipeline_console.delivery.service import prepare_batch, send

log = logging.getLogger("pipeline_console.worker")

MAX_BACKOFF_S = 10.0
ACTIVE_S = 60.0  # a system claimed this recently still counts as one sharing the slots
RECORD_TRIES = 30  # an outcome that cannot be recorded this often is left to recovery
RECORD_WAIT_S = 0.1  # how long a finished send may wait for others to share its record
MIN_LIMIT_WAIT_S = 0.02  # the soonest a claim follows one that a system's limits cut short


def share_of(concurrency: int, systems: int) -> int:
    """The most slots one system may hold."""
    if systems <= 1:
        return concurrency
    return max(1, concurrency - max(1, concurrency // 4))


@dataclass
class Pipeline:
    deliverer: Deliverer
    concurrency: int
    batch_size: int
    stop: asyncio.Event
    poll_interval_s: float = 1.0
    on_result: Callable[[DeliveryResult | BaseException], None] | None = None

    queued: dict[str, deque[Prepared]] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # consecutive, per system
    thresholds: dict[str, int] = field(default_factory=dict)
    to_record: list[tuple[Sent, int]] = field(default_factory=list)  # (sent, tries so far)
    to_release: list[Prepared] = field(default_factory=list)
    _claimed_at: dict[str, float] = field(default_factory=dict)  # per system, the last claim
    _throttled: dict[str, float] = field(default_factory=dict)  # per system, until (loop time)
    _full: set[str] = field(default_factory=set)  # held back by max_in_flight, last claim
    _last_sent: dict[str, int] = field(default_factory=dict)  # per system, its turn
    _turn: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _claiming: bool = False
    _recording: bool = False
    _releasing: bool = False
    _next_claim: float = 0.0
    _claim_backoff: float = 0.0
    _next_record: float = 0.0
    _record_backoff: float = 0.0
    _next_release: float = 0.0
    _first_finished: float = 0.0  # when the oldest of to_record finished
    _was_alive: bool = True

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Until `stop` is set and everything under way is sent and recorded."""
        loop = asyncio.get_running_loop()
        watcher = asyncio.ensure_future(self._wake_on_stop())
        try:
            while True:
                stopping = self.stop.is_set()
                if stopping:
                    for waiting in self.queued.values():
                        self.to_release.extend(waiting)
                        waiting.clear()
                self._dispatch()
                now = loop.time()
                if not stopping and not self._claiming and now >= self._next_claim \
                        and self._worth_claiming():
                    if self._alive():
                        self._start(self._claim())
                    else:  # the fence would refuse every claim: do not make any
                        self._next_claim = now + min(0.5, self.poll_interval_s)
                record_at = self._record_at(now, stopping)
                if self.to_record and not self._recording and now >= record_at:
                    self._start(self._record())
                if self.to_release and not self._releasing and (
                        now >= self._next_release or stopping):
                    self._start(self._release())
                if stopping and not self._tasks and not self.to_release and (
                        not self.to_record):
                    return
                self._wake.clear()
                later = [t - now for t in (self._next_claim, record_at, self._next_release)
                         if now < t < math.inf]
                timer = loop.call_later(min(later, default=self.poll_interval_s),
                                        self._wake.set)
                await self._wake.wait()
                timer.cancel()
        finally:
            watcher.cancel()
            for task in list(self._tasks):
                task.cancel()

    async def _wake_on_stop(self) -> None:
        await self.stop.wait()
        self._wake.set()

    def _failing(self, name: str) -> bool:
        """Whether a system failed as often as its circuit's threshold in this worker."""
        threshold = self.thresholds.get(name)
        return threshold is not None and self.failures.get(name, 0) >= threshold

    def _is_throttled(self, name: str) -> bool:
        until = self._throttled.get(name)
        return until is not None and asyncio.get_running_loop().time() < until

    def _throttle(self, name: str, seconds: float) -> None:
        """No sends to `name` for `seconds`: what waits here for it is released unsent."""
        until = asyncio.get_running_loop().time() + seconds
        self._throttled[name] = max(self._throttled.get(name, until), until)
        waiting = self.queued.get(name)
        if waiting:
            self.to_release.extend(waiting)
            waiting.clear()
            self._wake.set()

    def _alive(self) -> bool:
        """Whether this worker's heartbeat holds (claims made now could be sent)."""
        liveness = self.deliverer.liveness
        alive = liveness is None or liveness.holds(liveness.epoch, self.deliverer.monotonic())
        if alive != self._was_alive:
            self._was_alive = alive
            if alive:
                log.info("the heartbeat holds again: claiming")
            else:
                log.warning("the heartbeat does not hold (no heartbeat committed lately): "
                            "claiming nothing until one does")
        return alive

    def _wave(self) -> int:
        """How many claims, or finished sends, are worth one transaction: a batch."""
        return self.batch_size

    def _worth_claiming(self) -> bool:
        """Claim when idle, or when a wave fits: one claim transaction for many deliveries,
        as a pass had."""
        held = self._total(self.in_flight) + self._total(self.queued)
        room = self._room()
        if room <= 0:
            return False
        if held == 0 or room >= self._wave():
            return True
        # a free slot that nothing waiting may take (its systems are at their share)
        share = self._share()
        return self._total(self.in_flight) < self.concurrency and not any(
            waiting and self.in_flight.get(name, 0) < share
            for name, waiting in self.queued.items())

    def _record_at(self, now: float, stopping: bool) -> float:
        """When to record what has finished: at once if a wave is waiting, nothing is left on
        the wire, or the worker stops; otherwise RECORD_WAIT_S after the oldest."""
        if not self.to_record:
            return math.inf
        if stopping or len(self.to_record) >= self._wave() or not self._total(
                self.in_flight):
            return max(now if stopping else self._next_record, 0.0)
        return max(self._first_finished + RECORD_WAIT_S, self._next_record)

    def _start(self, work) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a delivery step failed unexpectedly", exc_info=task.exception())
        self._wake.set()

    # -- slots ------------------------------------------------------------------------

    def _total(self, counts: dict[str, int] | dict[str, deque]) -> int:
        return sum(len(v) if isinstance(v, deque) else v for v in counts.values())

    def _room(self) -> int:
        """How many more claims this worker may hold (sent or waiting): its slots and two
        batches waiting, so that a freed slot never waits for a claim transaction."""
        return min(self.batch_size, self.concurrency + 2 * self.batch_size
                   - self._total(self.in_flight) - self._total(self.queued))

    def _budgets(self) -> dict[str, int]:
        share = self._share()
        names = set(self.queued) | set(self.in_flight) | set(self.failures)
        budgets = {}
        for name in names | set(self._throttled):
            if self._failing(name) or self._is_throttled(name):
                budgets[name] = 0  # failing: no more claims until the circuit has its say
            else:
                budgets[name] = (share + -(-2 * self.batch_size * share // self.concurrency)
                                 - self.in_flight.get(name, 0) - len(self.queued.get(name, ())))
        return budgets

    def _share(self) -> int:
        """The slots one system may hold: all of them while it is the only one active here
        (claims waiting or in flight, or claimed in the last ACTIVE_S), fewer otherwise."""
        now = asyncio.get_running_loop().time()
        active = ({name for name, waiting in self.queued.items() if waiting}
                  | {name for name, count in self.in_flight.items() if count}
                  | {name for name, at in self._claimed_at.items() if now - at < ACTIVE_S})
        return share_of(self.concurrency, len(active))

    def _dispatch(self) -> None:
        """Start sends while slots are free: the system with the fewest in flight first."""
        share = self._share()
        while self._total(self.in_flight) < self.concurrency and not self.stop.is_set():
            ready = [name for name, waiting in self.queued.items()
                     if waiting and self.in_flight.get(name, 0) < share]
            if not ready:
                return
            # fewest in flight first; among those, the one whose turn is longest ago
            name = min(ready, key=lambda n: (self.in_flight.get(n, 0),
                                             self._last_sent.get(n, -1)))
            self._last_sent[name], self._turn = self._turn, self._turn + 1
            item = self.queued[name].popleft()
            if self.failures.get(name, 0) >= item.threshold or self._is_throttled(name) or (
                    not may_send(self.deliverer, item)):
                self.to_release.append(item)  # never sent: back to pending
                continue
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
            self._start(self._send(item))

    # -- the steps --------------------------------------------------------------------

    async def _claim(self) -> None:
        self._claiming = True
        loop = asyncio.get_running_loop()
        limit, budgets = self._room(), self._budgets()
        waiting = self._total(self.queued) + self._total(self.in_flight)
        notes = ClaimNotes()

        async def claim(session: AsyncSession):
            # each lease covers the waves it may wait in this worker's queue
            nonlocal notes
            notes = ClaimNotes()  # a transaction tried again starts afresh
            return await claim_due_rows(session, self.deliverer, limit, budgets=budgets,
                                        concurrency=self._share(),
                                        waiting=waiting, notes=notes)

        try:
            ids, prepared = await prepare_batch(self.deliverer, claim=claim)
        except Exception as error:
            self._claim_backoff = min(max(self._claim_backoff * 2, 0.5), MAX_BACKOFF_S)
            self._next_claim = loop.time() + self._claim_backoff
            if unavailability(error):  # expected while the database is away: one line
                log.warning("claiming failed (the database is %s: %s); trying again in "
                            "%.1f s", unavailability(error), error, self._claim_backoff)
            else:
                log.exception("claiming failed; trying again in %.1f s", self._claim_backoff)
            return
        finally:
            self._claiming = False
        self._claim_backoff = 0.0
        wall = self.deliverer.clock()
        for name, until in notes.throttled.items():  # perhaps another worker's answer
            self._throttle(name, (until - wall).total_seconds())
        self._full = notes.full
        for delivery_id in ids:
            item = prepared[delivery_id]
            if isinstance(item, Prepared):
                self.thresholds[item.config.name] = item.threshold
                self._claimed_at[item.config.name] = loop.time()
                self.queued.setdefault(item.config.name, deque()).append(item)
            elif self.on_result is not None:
                self.on_result(DeliveryResult(delivery_id, item))
        if notes.retry_in_s is not None and len(ids) < limit:
            # a system's limits left work behind: look again when it may have room
            self._next_claim = loop.time() + min(self.poll_interval_s,
                                                 max(notes.retry_in_s, MIN_LIMIT_WAIT_S))
        elif not ids:  # nothing due: look again after the poll interval
            self._next_claim = loop.time() + self.poll_interval_s

    async def _send(self, item: Prepared) -> None:
        name = item.config.name
        try:
            sent = await send(self.deliverer, item)
        except Exception as error:
            # Not known whether it left: the claim stays until it is recovered (worker_lost)
            log.error("sending delivery %s failed unexpectedly", item.delivery_id,
                      exc_info=error)
            if self.on_result is not None:
                self.on_result(error)
            return
        finally:
            self.in_flight[name] -= 1
        event = breaker_event(sent.classification, sent.rule)
        if event is CircuitEvent.FAILURE:
            self.failures[name] = self.failures.get(name, 0) + 1
        elif event is CircuitEvent.HEALTHY:
            self.failures[name] = 0
        throttle = throttle_s(sent.result, sent.rule)
        if throttle is not None:
            self._throttle(name, throttle)
        if not self.to_record:
            self._first_finished = asyncio.get_running_loop().time()
        self.to_record.append((sent, 0))

    async def _record(self) -> None:
        self._recording = True
        loop = asyncio.get_running_loop()
        batch, self.to_record = self.to_record, []
        try:
            results = await record_sent(self.deliverer, [sent for sent, _ in batch],
                                        trigger="scheduled", actor=self.deliverer.worker_id)
        except Exception as error:  # record_sent returns failures; this is a bug
            results = {sent.delivery_id: error for sent, _ in batch}
        finally:
            self._recording = False
        again = []
        for sent, tries in batch:
            result = results[sent.delivery_id]
            if isinstance(result, BaseException) and tries + 1 < RECORD_TRIES and (
                    not self.stop.is_set() or tries == 0):
                again.append((sent, tries + 1))  # the database may be back in a moment
                continue
            if isinstance(result, BaseException):
                log.error("the outcome of delivery %s could not be recorded; it will be "
                          "recovered as worker_lost", sent.delivery_id, exc_info=result)
            if self.on_result is not None:
                self.on_result(result)
        recorded = {sent.prepared.config.name for sent, _ in batch}
        if recorded & self._full:  # a slot of a system at its max_in_flight was freed
            self._next_claim = min(self._next_claim, loop.time())
        for name in recorded:
            if self._failing(name):
                # recorded: the circuit has counted them; its state now decides the claims
                self.failures[name] = 0
        if again:
            self.to_record = again + self.to_record
            self._record_backoff = min(max(self._record_backoff * 2, 0.5), MAX_BACKOFF_S)
            self._next_record = loop.time() + self._record_backoff
            log.warning("%d outcomes could not be recorded; trying again in %.1f s",
                        len(again), self._record_backoff)
        else:
            self._record_backoff = 0.0

    async def _release(self) -> None:
        self._releasing = True
        batch, self.to_release = self.to_release, []
        try:
            results = await release_unsent(self.deliverer, batch)
        except Exception:
            if self.stop.is_set():
                log.exception("releasing %d unsent claims failed while stopping; they will "
                              "be recovered as worker_lost", len(batch))
                return
            self.to_release = batch + self.to_release  # nothing was sent: keep trying
            self._next_release = asyncio.get_running_loop().time() + MAX_BACKOFF_S / 4
            log.exception("releasing %d unsent claims failed; trying again", len(batch))
            return
        finally:
            self._releasing = False
        if self.on_result is not None:
            for result in results.values():
                self.on_result(result)
