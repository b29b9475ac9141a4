"""The broker consumers where an operator looks: the console's intake page (states, filters,
pagination, the empty state, never a credential) and the dashboard's cards for a lost
consumer and a broker backlog that keeps growing. Rows come from the registry's own
functions on the test's clock, as a consumer process writes them; both databases."""

from __future__ import annotations

import html
import re
from datetime import timedelta

from pipeline_console.consumers.registry import (
    ConsumerIdentity,
    Counts,
    heartbeat,
    mark_stopped,
)

SECRET = "s3cret-broker-pass"


def identity(name: str, kind: str = "rabbitmq", *, queue: str = "orders",
             source: str = "amqp://broker-1:5672/erp") -> ConsumerIdentity:
    return ConsumerIdentity(kind, source, queue, host=f"host-{name}", pid=100,
                            id=f"consumer:{name}")


async def three_consumers(client, clock) -> dict[str, ConsumerIdentity]:
    """stopped (RabbitMQ), lost (NATS), alive (RabbitMQ, its backlog growing)."""
    database = client.app.state.database
    consumers = {"stopped": identity("stopped"),
                 "lost": identity("lost", "nats", queue="ORDERS/intake",
                                  source="nats://broker-2:4222"),
                 "alive": identity("alive", queue="invoices")}
    await heartbeat(database, consumers["stopped"], Counts(5, 5, 0), 0, clock.now)
    await mark_stopped(database, consumers["stopped"], Counts(7, 7, 1), clock.now)
    await heartbeat(database, consumers["lost"], Counts(40, 38, 2), 12, clock.now)
    clock.advance(seconds=20)
    await heartbeat(database, consumers["alive"], Counts(100, 99, 3), 10, clock.now)
    clock.advance(seconds=20)  # the lost one is 40 s silent (lost after 30 s)
    await heartbeat(database, consumers["alive"], Counts(200, 198, 4), 25, clock.now)
    return consumers


def rows(page: str) -> dict[str, str]:
    """Each consumer's table row, by id."""
    return dict(re.findall(r'<tr data-consumer="([^"]+)">(.*?)</tr>', page, re.S))


def cells(row: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", cell).strip()
            for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]


class TestTheIntakePage:
    async def test_each_consumer_is_shown_with_its_status_counts_and_backlog(
            self, client, clock):
        await three_consumers(client, clock)
        page = await client.get("/intake")
        assert page.status_code == 200
        assert 'href="/intake" aria-current="page"' in page.text  # in the nav
        shown = rows(page.text)
        assert list(shown) == ["consumer:alive", "consumer:lost", "consumer:stopped"]
        alive = cells(shown["consumer:alive"])
        assert alive[1:10] == ["alive", "rabbitmq", "amqp://broker-1:5672/erp", "invoices",
                               "2026-11-24 10:00:40Z", "200", "198", "4", "25"]
        assert alive[10].startswith("2026-11-24 10:00:40Z")  # grew between two heartbeats
        assert "host-alive" in alive[0] and "pid 100" in alive[0]
        lost = cells(shown["consumer:lost"])
        assert lost[1:10] == ["lost", "nats", "nats://broker-2:4222", "ORDERS/intake",
                              "2026-11-24 10:00:00Z", "40", "38", "2", "12"]
        assert lost[10] == "not growing"
        stopped = cells(shown["consumer:stopped"])
        assert stopped[1:10] == ["stopped", "rabbitmq", "amqp://broker-1:5672/erp", "orders",
                                 "2026-11-24 10:00:00Z", "7", "7", "1", "0"]

    async def test_the_filters_narrow_the_list_and_any_is_never_refused(self, client, clock):
        await three_consumers(client, clock)
        everyone = ["consumer:alive", "consumer:lost", "consumer:stopped"]
        for query, expected in (
                ("status=lost", ["consumer:lost"]),
                ("status=alive,stopped", ["consumer:alive", "consumer:stopped"]),
                ("kind=nats", ["consumer:lost"]),
                ("kind=rabbitmq&status=alive", ["consumer:alive"]),
                ("kind=nats&status=alive", []),
                ("kind=rabbitmq,nats", everyone),
                # the form's "any" (all), an empty choice, and both at once
                ("status=all", everyone), ("status=", everyone), ("kind=all", everyone),
                ("kind=", everyone), ("status=all&kind=all", everyone)):
            page = await client.get(f"/intake?{query}")
            assert page.status_code == 200, (query, page.text[:300])
            assert list(rows(page.text)) == expected, query
        nothing = await client.get("/intake?kind=nats&status=alive")
        assert "No consumer matches these filters." in nothing.text
        # the chosen filters stay chosen in the form
        narrowed = (await client.get("/intake?status=lost&kind=nats")).text
        assert '<option value="lost" selected>' in narrowed
        assert '<option value="nats" selected>' in narrowed

    async def test_an_unknown_filter_word_is_refused_naming_the_field(self, client, clock):
        await three_consumers(client, clock)
        for query, field in (("status=asleep", "status"), ("kind=kafka", "kind")):
            page = await client.get(f"/intake?{query}")
            assert page.status_code == 422, query
            assert page.headers["content-type"].startswith("text/html")
            assert f"{field}:" in html.unescape(page.text), query

    async def test_the_list_pages_with_a_cursor(self, client, clock):
        await three_consumers(client, clock)
        first = await client.get("/intake?limit=2")
        assert list(rows(first.text)) == ["consumer:alive", "consumer:lost"]
        link = re.search(r'href="(\?[^"]*cursor=[^"]+)" rel="next"', first.text)
        assert link
        second = await client.get("/intake" + html.unescape(link.group(1)))
        assert list(rows(second.text)) == ["consumer:stopped"]
        assert 'rel="next"' not in second.text

    async def test_with_no_consumer_it_says_how_to_start_one(self, client):
        page = await client.get("/intake")
        assert page.status_code == 200
        assert "No broker consumer has registered." in page.text
        assert "<code>pipeline-console consume URL --queue NAME</code>" in page.text

    async def test_no_credential_reaches_the_page_even_from_a_row_that_holds_them(
            self, client, clock):
        """Consumers store their broker without credentials; a row written otherwise (by
        hand, by an older consumer) must still never show them."""
        careless = identity("careless", source=f"amqps://ops:{SECRET}@broker-3:5671/vh"
                                               f"?auth_token={SECRET}-token")
        await heartbeat(client.app.state.database, careless, Counts(1, 1, 0), 3, clock.now)
        answers = [await client.get(path) for path in (
            "/intake", "/intake?status=alive", "/api/v1/intake", "/metrics", "/")]
        for answer in answers:
            assert answer.status_code == 200, answer.url
            assert SECRET not in answer.text and "//ops" not in answer.text, answer.url
        assert "amqps://broker-3:5671/vh" in answers[0].text
        [item] = answers[2].json()["items"]
        assert item["source"] == "amqps://broker-3:5671/vh"


class TestTheIntakeApi:
    async def test_the_list_filters_by_status_kind_last_seen_and_growth(self, client, clock):
        await three_consumers(client, clock)

        async def ids(query: str) -> list[str]:
            response = await client.get(f"/api/v1/intake?{query}")
            assert response.status_code == 200, (query, response.text)
            return [item["id"] for item in response.json()["items"]]

        assert await ids("") == ["consumer:alive", "consumer:lost", "consumer:stopped"]
        assert await ids("status=lost,stopped&kind=rabbitmq") == ["consumer:stopped"]
        assert await ids("from=2026-11-24T10:00:01Z") == ["consumer:alive"]
        assert await ids("backlog_growing_before=2026-11-24T10:00:40Z") == ["consumer:alive"]
        assert await ids("backlog_growing_before=2026-11-24T10:00:39Z") == []
        [alive] = (await client.get("/api/v1/intake?status=alive")).json()["items"]
        assert {key: alive[key] for key in ("status", "kind", "source", "queue", "received",
                                            "acknowledged", "rejected", "backlog",
                                            "backlog_growing_since")} == {
            "status": "alive", "kind": "rabbitmq", "source": "amqp://broker-1:5672/erp",
            "queue": "invoices", "received": 200, "acknowledged": 198, "rejected": 4,
            "backlog": 25, "backlog_growing_since": "2026-11-24T10:00:40Z"}
        for query, field in (("status=alive,asleep", "status"), ("kind=kafka", "kind"),
                             ("backlog_growing_before=yesterday", "backlog_growing_before")):
            refused = await client.get(f"/api/v1/intake?{query}")
            assert refused.status_code == 422, query
            assert refused.headers["content-type"] == "application/problem+json"
            assert field in [error["field"] for error in refused.json()["errors"]], query


async def dashboard_items(client) -> dict[str, dict]:
    items = (await client.get("/api/v1/dashboard")).json()["items"]
    return {item["name"]: item for item in items}


async def cards(client) -> dict[str, tuple[str, int]]:
    """The console dashboard's cards: name → (link, count)."""
    page = (await client.get("/")).text
    return {name: (html.unescape(href), int(count)) for href, name, count in re.findall(
        r'<a class="card \w+" href="([^"]+)" data-item="(\w+)"[^>]*>\s*'
        r'<div class="count">(\d+)</div>', page)}


class TestTheDashboardCards:
    async def test_a_lost_consumer_has_a_card_for_a_day_that_lists_it(self, client, clock):
        database = client.app.state.database
        lost, alive = identity("lost", "nats", queue="S/c"), identity("alive")
        await heartbeat(database, lost, Counts(), None, clock.now)
        await heartbeat(database, alive, Counts(), None, clock.now)
        assert "lost_consumers" not in await dashboard_items(client)  # both alive

        clock.advance(seconds=31)
        await heartbeat(database, alive, Counts(), None, clock.now)
        card = (await dashboard_items(client))["lost_consumers"]
        assert (card["count"], card["severity"]) == (1, "warning")
        assert card["oldest_age_s"] == 31
        listed = (await client.get(card["path"])).json()["items"]
        assert [c["id"] for c in listed] == ["consumer:lost"]
        href, count = (await cards(client))["lost_consumers"]
        assert href.startswith("/intake?status=lost&from=") and count == 1
        assert list(rows((await client.get(href)).text)) == ["consumer:lost"]

        await mark_stopped(database, alive, Counts(), clock.now)  # a stop is no alarm
        assert (await dashboard_items(client))["lost_consumers"]["count"] == 1
        clock.advance(hours=25)  # a day later the lost consumer is history
        assert "lost_consumers" not in await dashboard_items(client)
        assert "lost_consumers" not in await cards(client)
        still = (await client.get("/api/v1/intake?status=lost")).json()["items"]
        assert [c["id"] for c in still] == ["consumer:lost"]

    async def test_a_backlog_growing_longer_than_the_alert_has_a_card_until_it_shrinks(
            self, client, clock, settings):
        database = client.app.state.database
        assert settings.consumer_backlog_alert_s == 300
        busy, calm = identity("busy"), identity("calm", queue="quiet")
        backlog = 100
        await heartbeat(database, busy, Counts(), backlog, clock.now)
        await heartbeat(database, calm, Counts(), 5, clock.now)
        started = clock.now
        for _ in range(16):  # a heartbeat every 20 s for 320 s, the backlog up each time
            clock.advance(seconds=20)
            backlog += 50
            await heartbeat(database, busy, Counts(), backlog, clock.now)
            await heartbeat(database, calm, Counts(), 5, clock.now)
            items = await dashboard_items(client)
            grown_s = (clock.now - started - timedelta(seconds=20)).total_seconds()
            if grown_s < 300:  # it began to grow at the first of these heartbeats
                assert "consumers_falling_behind" not in items, grown_s
        card = items["consumers_falling_behind"]
        assert (card["count"], card["severity"], card["oldest_age_s"]) == (1, "warning", 300)
        assert "300 s" in card["title"]
        assert [c["id"] for c in (await client.get(card["path"])).json()["items"]] == [
            "consumer:busy"]
        href, count = (await cards(client))["consumers_falling_behind"]
        assert href.startswith("/intake?status=alive&backlog_growing_before=") and count == 1
        assert list(rows((await client.get(href)).text)) == ["consumer:busy"]

        clock.advance(seconds=20)
        await heartbeat(database, busy, Counts(), backlog - 10, clock.now)  # catching up
        await heartbeat(database, calm, Counts(), 5, clock.now)
        assert "consumers_falling_behind" not in await dashboard_items(client)
        assert "consumers_falling_behind" not in await cards(client)

    async def test_a_lost_consumer_is_not_also_falling_behind(self, client, clock):
        database = client.app.state.database
        busy = identity("busy")
        for backlog in range(0, 1000, 50):  # 20 heartbeats, 20 s apart: 380 s of growth
            await heartbeat(database, busy, Counts(), backlog, clock.now)
            clock.advance(seconds=20)
        assert (await dashboard_items(client))["consumers_falling_behind"]["count"] == 1
        clock.advance(seconds=30)  # then silence: lost, and its last backlog no alarm
        items = await dashboard_items(client)
        assert "consumers_falling_behind" not in items
        assert items["lost_consumers"]["count"] == 1
