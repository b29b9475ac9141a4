"""Replay eligibility, one row per rule."""

from dataclasses import replace

import pytest

from pipeline_console.replay.policy import ItemFacts, eligibility

OK = ItemFacts(target="dead letter 5", from_dead_letter=True, dead_letter_status="open",
               system="billing", system_exists=True, subscribed=True, entity_type="customer",
               production_version=3, version=3, circuit_state="closed", busy_status=None,
               latest_status="dead_lettered", repeated=False)


@pytest.mark.parametrize(("change", "reason"), [
    ({"dead_letter_status": None}, "does not exist"),
    ({"dead_letter_status": "closed"}, "is closed, not open"),
    ({"system_exists": False}, "no downstream system"),
    ({"subscribed": False}, "does not subscribe to customer"),
    ({"production_version": None}, "not in production"),
    ({"version": 2}, "version 2 is not the current production version (3)"),
    ({"circuit_state": "open"}, "circuit of billing is open"),
    ({"busy_status": "in_flight"}, "is in_flight; resolve that first"),
    ({"busy_status": "ambiguous"}, "is ambiguous; resolve that first"),
    ({"repeated": True}, "appears earlier"),
    ({"payload_current": False}, "no longer production's"),
    ({"validated_version": 2}, "moved from version 2 to 3 since validation"),
    ({"from_dead_letter": False, "latest_status": "pending"}, "already queued"),
    ({"from_dead_letter": False, "latest_status": "held"}, "already queued"),
    ({"from_dead_letter": False, "latest_status": "delivered"}, "set allow_delivered"),
])
def test_each_rule_refuses_with_its_reason(change, reason):
    verdict = eligibility(replace(OK, **change), allow_delivered=False)
    assert not verdict.eligible and reason in verdict.reason


@pytest.mark.parametrize("facts", [
    OK,
    replace(OK, circuit_state="half_open"),
    replace(OK, from_dead_letter=False, dead_letter_status=None, latest_status=None),
])
def test_eligible_items(facts):
    assert eligibility(facts, allow_delivered=False).eligible


def test_redelivery_is_allowed_only_when_asked_for():
    delivered = replace(OK, from_dead_letter=False, latest_status="delivered")
    assert eligibility(delivered, allow_delivered=True).eligible
    assert not eligibility(delivered, allow_delivered=False).eligible
