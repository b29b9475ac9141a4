"""Replay eligibility: a pure function of the facts about one item.

Replaying something already delivered is allowed only when the request says so explicitly
(`allow_delivered`): the system receives the same Idempotency-Key again, so a well-behaved
system ignores it, but the operator must mean it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ItemFacts:
    target: str  # "dead letter 5" or "customer:C-100 → billing"
    from_dead_letter: bool
    dead_letter_status: str | None  # None: no such dead letter
    system: str | None
    system_exists: bool
    subscribed: bool
    entity_type: str | None
    production_version: int | None  # None: the record is not in production
    version: int | None  # the version this item would send
    circuit_state: str | None
    busy_status: str | None  # a delivery of the record to the system in_flight or ambiguous
    latest_status: str | None  # the status of the newest delivery of `version` to the system
    repeated: bool  # the same target appears earlier in the request
    payload_current: bool = True  # the delivery's payload is production's current payload
    validated_version: int | None = None  # at execution: the version checked at validation


@dataclass(frozen=True)
class Eligibility:
    eligible: bool
    reason: str


def eligibility(facts: ItemFacts, *, allow_delivered: bool) -> Eligibility:
    def no(reason: str) -> Eligibility:
        return Eligibility(False, reason)

    if facts.from_dead_letter and facts.dead_letter_status is None:
        return no(f"{facts.target} does not exist")
    if facts.from_dead_letter and facts.dead_letter_status != "open":
        return no(f"{facts.target} is {facts.dead_letter_status}, not open")
    if not facts.system_exists:
        return no(f"no downstream system is named {facts.system!r}")
    if not facts.subscribed:
        return no(f"{facts.system} does not subscribe to {facts.entity_type}")
    if facts.production_version is None:
        return no("the record is not in production")
    if facts.validated_version is not None and facts.validated_version != facts.production_version:
        return no(f"production moved from version {facts.validated_version} to "
                  f"{facts.production_version} since validation")
    if facts.version != facts.production_version:
        return no(f"version {facts.version} is not the current production version "
                  f"({facts.production_version}); an older version is never pushed downstream")
    if not facts.payload_current:
        return no(f"this delivery's payload is no longer production's: a correction of version "
                  f"{facts.version} was accepted since; replay the record by key instead")
    if facts.circuit_state == "open":
        return no(f"the circuit of {facts.system} is open; reset it first")
    if facts.busy_status is not None:
        return no(f"a delivery of this record to {facts.system} is {facts.busy_status}; "
                  "resolve that first")
    if facts.repeated:
        return no("the same delivery appears earlier in this request")
    if facts.latest_status in ("pending", "held"):
        return no(f"version {facts.version} is already queued for {facts.system} "
                  f"({facts.latest_status})")
    if facts.latest_status == "delivered" and not allow_delivered:
        return no(f"version {facts.version} was already delivered to {facts.system}; "
                  "set allow_delivered to send it again")
    return Eligibility(True, f"eligible: version {facts.version} will be sent to {facts.system}")
