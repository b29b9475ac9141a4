"""Delivery decisions as pure functions: classify an outcome, the delay before a retry, what
follows an attempt, and the circuit breaker's transitions."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Classification(StrEnum):
    SUCCESS = "success"
    TRANSIENT = "transient"  # retry with backoff
    PERMANENT = "permanent"  # dead-letter at once
    AMBIGUOUS = "ambiguous"  # may or may not have been applied: never retried blindly
    # Ambiguous too, but because our worker stopped (or its lease ran out) before it
    # recorded an answer: says nothing about the downstream system's health.
    WORKER_LOST = "worker_lost"


class Failure(StrEnum):
    """Why a send produced no HTTP status."""

    NOT_SENT = "not_sent"  # connection refused, connect timeout: the request never left
    MAYBE_SENT = "maybe_sent"  # read timeout, broken connection: it may have arrived
    # The TLS handshake failed on a certificate: theirs is not trusted, or they refused ours
    # (TLS 1.3 says so only on the first read, after the request was written, but the
    # server's application never saw it). Never applied, and no retry can mend it.
    CERTIFICATE = "certificate"
    # The OAuth2 token endpoint could not give a token: unreachable, or it answered 5xx or
    # 429 (TOKEN_UNAVAILABLE, retried), or it refused our client (TOKEN_REFUSED: a 4xx such
    # as invalid_client, which no retry mends). The delivery itself never left.
    TOKEN_UNAVAILABLE = "token_unavailable"
    TOKEN_REFUSED = "token_refused"
    # This process's key cannot read the system's secret (stored with another key: a worker
    # left on the old key after `secrets rotate-key`). Nothing left; another worker, or this
    # one restarted, can send it: retried, but neither the system's failure nor a try.
    SECRET_UNREADABLE = "secret_unreadable"
    # the request could not be made of this record (its body_template failed) or of the
    # system's settings (a stored credential a header cannot carry): nothing was sent, and
    # trying again would fail the same way
    UNSENDABLE = "unsendable"


@dataclass(frozen=True)
class SendResult:
    status: int | None = None
    body: str = ""
    retry_after_s: float | None = None
    failure: Failure | None = None
    error: str | None = None
    latency_ms: float = 0.0


TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# 5xx answers that say the request itself will never work; other 5xx (proxies' and CDNs'
# 520-599 included) are the server's trouble and are retried.
PERMANENT_5XX = frozenset({501, 505})
MAX_RETRY_AFTER_S = 86_400.0
UNSENDABLE_RULE = "unsendable"
SECRET_UNREADABLE_RULE = "secret_unreadable"
# The shortest wait after a throttled try (a "Retry-After: 0", or a date in the past, would
# otherwise send again at once, for ever: a throttled try never exhausts a delivery).
MIN_THROTTLE_WAIT_S = 1.0
# A 429 or 503 that says when to come back (Retry-After) throttles the whole system: it is
# the system's back-pressure, not its failure. The pause of the whole system is capped (a
# stray "Retry-After: 86400" must not stop every delivery for a day unseen); the delivery
# that got the answer still waits its own Retry-After (backoff_s, up to a day).
THROTTLE_STATUSES = frozenset({429, 503})
MAX_THROTTLE_S = 900.0
THROTTLED_RULE_PREFIX = "throttled:"


def classify(result: SendResult, overrides: list[dict[str, Any]]) -> tuple[Classification, str]:
    """The classification and the name of the rule that decided it.

    `overrides` are the system's own rules, checked first:
    [{"status": 409, "classification": "success"}, …].
    """
    if result.failure is Failure.UNSENDABLE:
        return Classification.PERMANENT, UNSENDABLE_RULE
    if result.failure is Failure.SECRET_UNREADABLE:
        return Classification.TRANSIENT, SECRET_UNREADABLE_RULE
    if result.failure is Failure.NOT_SENT:
        return Classification.TRANSIENT, "not_sent"
    if result.failure is Failure.CERTIFICATE:
        return Classification.PERMANENT, "tls_certificate"
    if result.failure is Failure.TOKEN_UNAVAILABLE:
        return Classification.TRANSIENT, "token_endpoint_unavailable"
    if result.failure is Failure.TOKEN_REFUSED:
        return Classification.PERMANENT, "token_endpoint_refused"
    if result.failure is Failure.MAYBE_SENT or result.status is None:
        return Classification.AMBIGUOUS, "maybe_sent"
    for override in overrides:
        if override.get("status") == result.status:
            return Classification(override["classification"]), f"override:{result.status}"
    if 200 <= result.status < 300:
        return Classification.SUCCESS, "2xx"
    if result.status in THROTTLE_STATUSES and result.retry_after_s is not None:
        return Classification.TRANSIENT, f"{THROTTLED_RULE_PREFIX}{result.status}"
    if result.status in TRANSIENT_STATUSES:
        return Classification.TRANSIENT, f"transient:{result.status}"
    if 500 <= result.status < 600 and result.status not in PERMANENT_5XX:
        return Classification.TRANSIENT, "transient:5xx"
    if 400 <= result.status < 500:
        return Classification.PERMANENT, "4xx"
    return Classification.PERMANENT, f"other:{result.status}"


def is_throttle(rule: str | None) -> bool:
    """Whether an attempt's rule says the system throttled us (a 429 or 503 with
    Retry-After, not overridden by the system's own rules)."""
    return rule is not None and rule.startswith(THROTTLED_RULE_PREFIX)


def is_uncounted(rule: str | None) -> bool:
    """Whether a try does not count toward max_attempts nor the backoff: throttled, or not
    sent because this process could not read the system's secret."""
    return is_throttle(rule) or rule == SECRET_UNREADABLE_RULE


def throttle_s(result: SendResult, rule: str | None) -> float | None:
    """For how long a throttling answer pauses the whole system (None: it does not)."""
    if not is_throttle(rule) or result.retry_after_s is None:
        return None
    return min(max(result.retry_after_s, 0.0), MAX_THROTTLE_S)


# max_per_second's token bucket holds at most this many seconds' worth of sends (at least
# one): enough that a claim a little late loses nothing and one claim carries a batch, and
# little enough that a system counting per second sees at most a fifth more in one second.
RATE_BURST_S = 0.2


def rate_burst(per_second: float) -> float:
    return max(1.0, per_second * RATE_BURST_S)


def refill(tokens: float | None, elapsed_s: float, per_second: float) -> float:
    """max_per_second's bucket after `elapsed_s` (a bucket never used starts full; time
    that seems to run backwards, another machine's clock, adds nothing)."""
    burst = rate_burst(per_second)
    if tokens is None:
        return burst
    return min(burst, tokens + max(elapsed_s, 0.0) * per_second)


def backoff_s(
    attempts_made: int, base_s: float, max_s: float, rng: random.Random,
    retry_after_s: float | None = None,
) -> float:
    """Delay before the next try: base * 2**(n-1), capped at max, with jitter in [1/2, 1] of it;
    never shorter than the server's Retry-After (honoured up to a day)."""
    ceiling = min(base_s * 2 ** max(attempts_made - 1, 0), max_s)
    delay = ceiling * (0.5 + rng.random() / 2)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
    return delay


class Step(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    AMBIGUOUS = "ambiguous"


def next_step(classification: Classification, attempts_made: int, max_attempts: int,
              rule: str | None = None) -> Step:
    """`attempts_made`: the tries that count toward max_attempts. A throttled try never
    exhausts a delivery: the system asked us to wait and we did; nothing failed. (Its
    tries are bounded all the same: a throttled system is paused as a whole, so it gets at
    most a claim's worth of requests per pause.)"""
    if classification is Classification.SUCCESS:
        return Step.DELIVERED
    if classification in (Classification.AMBIGUOUS, Classification.WORKER_LOST):
        return Step.AMBIGUOUS
    if classification is Classification.PERMANENT:
        return Step.DEAD_LETTER
    if is_uncounted(rule):
        return Step.RETRY
    if attempts_made >= max_attempts:
        return Step.DEAD_LETTER
    return Step.RETRY


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitEvent(StrEnum):
    HEALTHY = "healthy"  # a success, or a permanent answer: the system is up
    FAILURE = "failure"  # a transient or ambiguous outcome
    NONE = "none"  # an outcome that says nothing about the system (worker_lost)
    RESET = "reset"  # an operator lets one trial through
    FORCE_OPEN = "force_open"  # an operator stops deliveries


@dataclass(frozen=True)
class Breaker:
    state: CircuitState
    consecutive_failures: int = 0


class TransitionRefused(ValueError):
    pass


def breaker_event(classification: Classification, rule: str | None = None) -> CircuitEvent:
    if rule in (UNSENDABLE_RULE, SECRET_UNREADABLE_RULE):
        return CircuitEvent.NONE  # nothing was sent: the system was not asked anything
    if is_throttle(rule):
        return CircuitEvent.NONE  # back-pressure: the system is up and asked us to wait
    if classification in (Classification.TRANSIENT, Classification.AMBIGUOUS):
        return CircuitEvent.FAILURE
    if classification is Classification.WORKER_LOST:
        return CircuitEvent.NONE  # only the downstream's answers (or silence) move a circuit
    return CircuitEvent.HEALTHY


def transition(breaker: Breaker, event: CircuitEvent, threshold: int) -> Breaker:
    """The breaker's next state. No transition is time-based: only an operator's reset
    leaves `open`, and only through `half_open`."""
    state = breaker.state
    if event is CircuitEvent.NONE:
        return breaker
    if event is CircuitEvent.RESET:
        if state is not CircuitState.OPEN:
            raise TransitionRefused(f"the circuit is {state.value}; only an open circuit resets")
        return Breaker(CircuitState.HALF_OPEN, breaker.consecutive_failures)
    if event is CircuitEvent.FORCE_OPEN:
        if state is CircuitState.OPEN:
            raise TransitionRefused("the circuit is already open")
        return Breaker(CircuitState.OPEN, breaker.consecutive_failures)
    if state is CircuitState.OPEN:
        return breaker  # outcomes of sends that were already under way change nothing
    if state is CircuitState.HALF_OPEN:
        if event is CircuitEvent.HEALTHY:
            return Breaker(CircuitState.CLOSED, 0)
        return Breaker(CircuitState.OPEN, breaker.consecutive_failures + 1)
    if event is CircuitEvent.HEALTHY:
        return Breaker(CircuitState.CLOSED, 0)
    failures = breaker.consecutive_failures + 1
    return Breaker(CircuitState.OPEN if failures >= threshold else CircuitState.CLOSED, failures)
