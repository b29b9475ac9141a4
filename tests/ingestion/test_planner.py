"""The batch planner: properties over any interleaving of messages for one key."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_console.ingestion.planner import KeySnapshot, Plan, plan_batch
from pipeline_console.ingestion.policy import CurrentState, Decision
from tests.support import message, parsed

PAYLOADS = [{"name": "Acme"}, {"name": "ACME"}, {"name": "Acme", "country": "DE"}, {}]


def always_complete(_entity_type: str, _payload: dict[str, Any]) -> list[dict[str, Any]]:
    return []


def needs_country(_entity_type: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [] if "country" in payload else [{"path": "/", "message": "'country' is required"}]


messages_for_one_key = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, len(PAYLOADS) - 1),
              st.sampled_from(["erp", "crm", "shop"])),
    min_size=1, max_size=12,
).map(lambda items: [parsed(message(version, PAYLOADS[p], source_system=source))
                     for version, p, source in items])


def run_one_at_a_time(messages, completeness):
    """Feed messages one per batch, threading state and production like the database does."""
    snapshots: dict[str, KeySnapshot] = {}
    production: dict[str, Any] = {}
    plans: list[Plan] = []
    for incoming in messages:
        plan = plan_batch([incoming], snapshots, completeness)
        plans.append(plan)
        for key, state in plan.new_states.items():
            previous = snapshots.get(key)
            snapshots[key] = KeySnapshot(state, previous.production_version if previous else None)
        for key in plan.production:
            production[key] = incoming
            snapshots[key] = KeySnapshot(snapshots[key].state, incoming.version)
    return plans, production, snapshots


class TestPropertiesOfAnyInterleaving:
    @settings(max_examples=300)
    @given(messages_for_one_key)
    def test_production_holds_the_first_payload_of_the_highest_accepted_version(self, messages):
        plans, production, _ = run_one_at_a_time(messages, always_complete)
        accepted = [m for m, p in zip(messages, plans, strict=True)
                    if p.outcomes[0].decision.accepted]
        highest = max(accepted, key=lambda m: m.version)
        assert production["customer:C-100"].payload == highest.payload
        # exactly one accepted message per version: the first one
        assert len({m.version for m in accepted}) == len(accepted)

    @settings(max_examples=300)
    @given(messages_for_one_key)
    def test_the_current_version_never_goes_down(self, messages):
        plans, _, _ = run_one_at_a_time(messages, always_complete)
        versions = [state.version for plan in plans for state in plan.new_states.values()]
        assert versions == sorted(versions)
        assert len(versions) == len(set(versions))

    @settings(max_examples=300)
    @given(messages_for_one_key)
    def test_every_message_gets_exactly_one_outcome(self, messages):
        batch = plan_batch(messages, {}, always_complete)
        assert len(batch.outcomes) == len(messages)

    @settings(max_examples=300)
    @given(messages_for_one_key)
    def test_a_same_version_conflict_always_opens_a_quarantine(self, messages):
        batch = plan_batch(messages, {}, always_complete)
        current: dict[int, str] = {}
        highest = -1
        for incoming, outcome in zip(messages, batch.outcomes, strict=True):
            conflict = incoming.version == highest and current[highest] != incoming.payload_hash
            assert (outcome.decision is Decision.QUARANTINE) == conflict
            if conflict:
                assert outcome.quarantine_index is not None
                quarantine = batch.quarantines[outcome.quarantine_index]
                assert quarantine.current.payload_hash == current[highest]
            if outcome.decision.accepted:
                highest = incoming.version
                current[highest] = incoming.payload_hash

    @settings(max_examples=300)
    @given(messages_for_one_key)
    def test_a_batch_decides_exactly_as_the_same_messages_one_by_one(self, messages):
        for completeness in (always_complete, needs_country):
            plans, _, snapshots = run_one_at_a_time(messages, completeness)
            batch = plan_batch(messages, {}, completeness)
            one_by_one = [(p.outcomes[0].decision, p.outcomes[0].staging_status) for p in plans]
            assert [(o.decision, o.staging_status) for o in batch.outcomes] == one_by_one
            assert batch.new_states == {k: s.state for k, s in snapshots.items()}

    @settings(max_examples=300)
    @given(messages_for_one_key)
    def test_the_audit_promotes_only_what_reaches_production_and_explains_the_rest(
        self, messages
    ):
        for completeness in (always_complete, needs_country):
            plan = plan_batch(messages, {}, completeness)
            promoted = [d.details["version"] for d in plan.audit
                        if d.action == "record.promoted"]
            in_production = [plan.staging[i].version for i in plan.production.values()]
            assert promoted == in_production  # production is written once per key
            superseded = sorted(d.details["version"] for d in plan.audit
                                if d.action == "record.superseded")
            assert superseded == sorted(row.version for row in plan.staging
                                        if row.status == "superseded")
            accepted = {d.details["version"]: d.details["staging_status"] for d in plan.audit
                        if d.action == "record.accepted"}
            assert all(accepted[row.version] != "promoted" for row in plan.staging
                       if row.status != "promoted")

    @settings(max_examples=200)
    @given(messages_for_one_key)
    def test_with_a_schema_production_is_the_highest_accepted_complete_version(self, messages):
        plans, production, _ = run_one_at_a_time(messages, needs_country)
        complete = [m for m, p in zip(messages, plans, strict=True)
                    if p.outcomes[0].decision.accepted and "country" in m.payload]
        if not complete:
            assert production == {}
        else:
            assert production["customer:C-100"].version == max(m.version for m in complete)


class TestStaging:
    def test_a_partial_record_is_not_promoted(self):
        plan = plan_batch([parsed(message(1, {"name": "Globex"}))], {}, needs_country)
        assert plan.outcomes[0].staging_status == "partial"
        assert plan.production == {}
        assert plan.staging[0].validation_errors

    def test_a_newer_complete_version_completes_a_partial_record(self):
        plan = plan_batch(
            [parsed(message(1, {"name": "Globex"})),
             parsed(message(2, {"name": "Globex", "country": "US"}))],
            {}, needs_country,
        )
        assert [o.staging_status for o in plan.outcomes] == ["partial", "promoted"]
        assert [row.status for row in plan.staging] == ["superseded", "promoted"]
        assert plan.production == {"customer:C-100": 1}

    def test_a_newer_version_marks_older_unpromoted_rows_in_the_database_superseded(self):
        existing = {"customer:C-100": KeySnapshot(CurrentState(1, "h", "erp"), None)}
        plan = plan_batch([parsed(message(2)), parsed(message(3, {"v": 3}))], existing,
                          always_complete)
        assert plan.superseding_keys == {"customer:C-100": 2}  # by its first newer version

    def test_versions_superseded_within_the_batch_are_never_promoted(self):
        plan = plan_batch([parsed(message(v, {"v": v})) for v in (1, 2, 3)], {},
                          always_complete)
        # each answer is the one the message would have got alone
        assert [o.staging_status for o in plan.outcomes] == ["promoted"] * 3
        assert [row.status for row in plan.staging] == ["superseded", "superseded", "promoted"]
        assert plan.production == {"customer:C-100": 2}
        assert [(d.action, d.details["version"]) for d in plan.audit] == [
            ("record.accepted", 1), ("record.accepted", 2), ("record.superseded", 1),
            ("record.accepted", 3), ("record.superseded", 2), ("record.promoted", 3)]
        superseded = [d.details for d in plan.audit if d.action == "record.superseded"]
        assert [(d["superseded_by"], d["within_batch"], d["staged_as"]) for d in superseded
                ] == [(2, True, "complete"), (3, True, "complete")]

    def test_promotion_never_lowers_the_production_version(self):
        # production already holds version 5 (e.g. after an operator resolution)
        existing = {"customer:C-100": KeySnapshot(CurrentState(4, "h", "erp"), 5)}
        plan = plan_batch([parsed(message(5, {"name": "x", "country": "y"}))], existing,
                          always_complete)
        assert plan.outcomes[0].staging_status == "complete"
        assert plan.production == {}
