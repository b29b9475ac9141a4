"""Group commit: concurrent POST /messages share transactions, yet each caller gets its own
decision, exactly as if the requests had come one at a time, and only after its commit."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import event, func, select

from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine, unavailability
from pipeline_console.ingestion import group_commit
from pipeline_console.ingestion.group_commit import GroupCommitClosed, GroupCommitter
from pipeline_console.models import AuditEvent, IngestionAttempt
from tests.conftest import make_token
from tests.support import FakeClock, message, parsed

PROBLEM = "application/problem+json"


def contested_bodies(count: int, *, keys: int = 6, entity_type: str = "customer",
                     seed: int = 3) -> list[dict[str, Any]]:
    """Messages crowding onto a few keys: every decision (new, supersede, duplicate, stale,
    conflict) is likely, and the order they are decided in matters."""
    rng = random.Random(seed)
    bodies = []
    for n in range(count):
        version = rng.randint(1, 4)
        payload = {"v": version} if rng.random() < 0.8 else {"v": version, "other": n}
        bodies.append(message(version, payload, entity_type=entity_type,
                              entity_id=f"K-{rng.randrange(keys)}",
                              source_system=rng.choice(["erp", "crm"])))
    return bodies


def decisions_metric() -> Counter:
    counts: Counter = Counter()
    for metric in REGISTRY.collect():
        if metric.name == "pipeline_ingestion_decisions":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["decision"]] += sample.value
    return counts


def comparable(body: dict[str, Any]) -> tuple:
    return (body["decision"], body["version"], body["staging_status"],
            body["anomaly_id"] is not None)


class TestConcurrentRequestsDecideAsSequentialOnes:
    async def test_parallel_answers_equal_the_same_messages_sent_one_at_a_time(self, client):
        before = decisions_metric()
        bodies = contested_bodies(60)
        responses = await asyncio.gather(
            *(client.post("/api/v1/messages", json=body) for body in bodies))
        assert {response.status_code for response in responses} == {200}
        parallel = [response.json() for response in responses]

        # The order the server decided them in is the attempt order. Sending the same
        # messages one at a time in that order (under another entity type, so on fresh keys)
        # must give every message the same answer.
        in_commit_order = sorted(zip(parallel, bodies, strict=True),
                                 key=lambda pair: pair[0]["attempt_id"])
        sequential = []
        for _, body in in_commit_order:
            response = await client.post("/api/v1/messages",
                                         json={**body, "entity_type": "shadow"})
            assert response.status_code == 200
            sequential.append(response.json())
        assert [comparable(answer) for answer, _ in in_commit_order] == [
            comparable(answer) for answer in sequential]
        assert {answer["idempotency_key"] for answer, _ in in_commit_order} == {
            f"customer:{body['entity_id']}" for body in bodies}
        assert len({answer["attempt_id"] for answer in parallel}) == len(bodies)

        # Counted once each, after their commits.
        after = decisions_metric()
        counted = Counter({decision: after[decision] - before[decision] for decision in after})
        expected = Counter(answer["decision"] for answer in parallel + sequential)
        assert +counted == expected

    async def test_many_callers_with_different_tokens_are_each_named_in_the_audit_log(
        self, client, database, clock
    ):
        tokens = {name: await make_token(database, "ingest", name=name, now=clock.now)
                  for name in ("source-a", "source-b", "source-c")}
        names = list(tokens)
        bodies = [message(1, {"n": n}, entity_id=f"A-{n}") for n in range(30)]
        responses = await asyncio.gather(*(
            client.post("/api/v1/messages", json=body,
                        headers={"Authorization": f"Bearer {tokens[names[n % 3]]}"})
            for n, body in enumerate(bodies)))
        assert {response.status_code for response in responses} == {200}
        async with database.read() as session:
            rows = (await session.execute(
                select(AuditEvent.idempotency_key, AuditEvent.actor)
                .where(AuditEvent.action == "record.accepted"))).all()
        actors = dict(rows)
        for n in range(30):
            assert actors[f"customer:A-{n}"] == f"{names[n % 3]} (ingest)"


class TestOneGroup:
    """The committer itself: requests queued before the flusher runs form one group."""

    async def test_queued_messages_share_one_transaction_and_keep_their_order(
        self, database, monkeypatch
    ):
        calls: list[int] = []
        real = group_commit.ingest_messages

        async def counting(session, items, **kwargs):
            calls.append(len(items))
            return await real(session, items, **kwargs)

        monkeypatch.setattr(group_commit, "ingest_messages", counting)
        committer = GroupCommitter(database)
        now = FakeClock().now
        bodies = [message(1, {"a": 1}), message(1, {"a": 1}), message(2, {"a": 2}),
                  message(1, {"a": 0}), message(2, {"a": 3})]
        try:
            results = await asyncio.gather(*(
                committer.ingest(parsed(body), actor="t", now=now) for body in bodies))
        finally:
            await committer.close()
        assert calls == [5]  # one group, one call, one transaction
        assert [result.decision for result in results] == [
            "accept_new", "skip_duplicate", "accept_supersede", "skip_stale", "quarantine"]

    async def test_versions_superseded_within_the_group_are_not_audited_as_promoted(
        self, database
    ):
        committer = GroupCommitter(database)
        now = FakeClock().now
        try:
            results = await asyncio.gather(*(
                committer.ingest(parsed(message(v, {"v": v})), actor="t", now=now)
                for v in (1, 2, 3)))
        finally:
            await committer.close()
        assert [result.staging_status for result in results] == ["promoted"] * 3
        async with database.read() as session:
            rows = (await session.execute(
                select(AuditEvent.action, AuditEvent.details)
                .where(AuditEvent.action.in_(("record.promoted", "record.superseded")))
                .order_by(AuditEvent.id))).all()
        assert [(row.action, row.details["version"]) for row in rows] == [
            ("record.superseded", 1), ("record.superseded", 2), ("record.promoted", 3)]

    async def test_a_mixed_group_is_written_in_runs_of_one_actor_in_order(self, database):
        committer = GroupCommitter(database)
        now = FakeClock().now
        actors = ["a", "a", "b", "a", "c", "c"]
        try:
            results = await asyncio.gather(*(
                committer.ingest(parsed(message(n + 1, {"n": n})), actor=actor, now=now)
                for n, actor in enumerate(actors)))
        finally:
            await committer.close()
        assert [result.decision for result in results] == ["accept_new"] + [
            "accept_supersede"] * 5
        async with database.read() as session:
            rows = (await session.execute(
                select(AuditEvent.actor, AuditEvent.details)
                .where(AuditEvent.action == "record.accepted").order_by(AuditEvent.id))).all()
        assert [(row.actor, row.details["version"]) for row in rows] == [
            (actor, n + 1) for n, actor in enumerate(actors)]

    async def test_one_message_that_breaks_the_transaction_fails_only_its_own_caller(
        self, database
    ):
        def poison(_connection, _cursor, statement, parameters, _context, _many):
            if "ingestion_attempts" in statement and "POISON" in repr(parameters):
                raise RuntimeError("this row cannot be written (simulated)")

        engine = database.engine.sync_engine
        event.listen(engine, "before_cursor_execute", poison)
        committer = GroupCommitter(database)
        now = FakeClock().now
        ids = ["C-1", "POISON", "C-2", "C-1"]
        try:
            outcomes = await asyncio.gather(*(
                committer.ingest(parsed(message(1, {"x": 1}, entity_id=entity_id)),
                                 actor="t", now=now)
                for entity_id in ids), return_exceptions=True)
        finally:
            await committer.close()
            event.remove(engine, "before_cursor_execute", poison)
        assert isinstance(outcomes[1], RuntimeError)
        assert [outcome.decision for outcome in (outcomes[0], outcomes[2], outcomes[3])] == [
            "accept_new", "accept_new", "skip_duplicate"]
        async with database.read() as session:
            written = (await session.execute(
                select(IngestionAttempt.entity_id).order_by(IngestionAttempt.id))).scalars()
            assert list(written) == ["C-1", "C-2", "C-1"]

    async def test_closing_answers_everything_queued_then_refuses_new_messages(self, database):
        committer = GroupCommitter(database, max_messages=2)
        now = FakeClock().now
        tasks = [asyncio.create_task(committer.ingest(
            parsed(message(1, entity_id=f"D-{n}")), actor="t", now=now)) for n in range(7)]
        await asyncio.sleep(0)  # every task has queued its message
        await committer.close()
        assert all(task.done() for task in tasks)
        assert [task.result().decision for task in tasks] == ["accept_new"] * 7
        with pytest.raises(GroupCommitClosed):
            await committer.ingest(parsed(message(1, entity_id="late")), actor="t", now=now)


    async def test_an_unreachable_database_fails_the_whole_group_with_one_try(self):
        """Not once more per message: each try would wait out the connect timeout again."""
        accepted: list[asyncio.StreamWriter] = []

        async def never_answer(_reader, writer):
            accepted.append(writer)

        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        database = Database(create_engine(Settings(
            database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres",
            database_connect_timeout_s=0.3)))
        committer = GroupCommitter(database)
        now = FakeClock().now
        try:
            outcomes = await asyncio.gather(*(
                committer.ingest(parsed(message(1, entity_id=f"U-{n}")), actor="t", now=now)
                for n in range(10)), return_exceptions=True)
        finally:
            await committer.close()
            await database.dispose()
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()
        assert [unavailability(outcome) for outcome in outcomes] == ["unreachable"] * 10
        assert len(accepted) == 1  # one connect for the group, none per message


class TestNoAnswerBeforeTheCommit:
    async def test_a_failing_commit_reaches_every_caller_of_the_group_as_an_error(
        self, client, database
    ):
        """Only the commits of ingestion transactions fail (the token checks still pass):
        every caller gets a 5xx problem, nothing is recorded, nothing is counted."""
        engine = database.engine.sync_engine

        def note_ingestion(connection, _cursor, statement, *_args):
            if statement.lstrip().upper().startswith("INSERT INTO INGESTION_ATTEMPTS"):
                connection.info["ingesting"] = True

        def refuse_commit(connection):
            if connection.info.pop("ingesting", False):
                raise RuntimeError("disk full (simulated at commit)")

        def forget(connection):
            connection.info.pop("ingesting", None)

        listeners = [("before_cursor_execute", note_ingestion), ("commit", refuse_commit),
                     ("rollback", forget)]
        for name, listener in listeners:
            event.listen(engine, name, listener)
        before = decisions_metric()
        bodies = [message(1, {"n": n}, entity_id=f"F-{n % 5}") for n in range(20)]
        try:
            responses = await asyncio.gather(
                *(client.post("/api/v1/messages", json=body) for body in bodies))
        finally:
            for name, listener in listeners:
                event.remove(engine, name, listener)
        assert [response.status_code for response in responses] == [500] * len(bodies)
        assert {response.headers["content-type"] for response in responses} == {PROBLEM}
        async with database.read() as session:
            assert await session.scalar(
                select(func.count()).select_from(IngestionAttempt)) == 0
        assert decisions_metric() == before

        # Nothing of it was kept: the same messages are new when sent again.
        again = await client.post("/api/v1/messages", json=bodies[0])
        assert again.status_code == 200
        assert again.json()["decision"] == "accept_new"

    async def test_every_answer_names_an_attempt_that_is_committed(self, client, database):
        bodies = contested_bodies(40, seed=11)
        responses = await asyncio.gather(
            *(client.post("/api/v1/messages", json=body) for body in bodies))
        ids = {response.json()["attempt_id"] for response in responses}
        async with database.read() as session:
            stored = set((await session.execute(select(IngestionAttempt.id))).scalars())
        assert ids <= stored
