"""Status filters of the lists take several statuses, comma separated (`?status=pending,held`),
in the API and on the console; an unknown one is a 422 naming the parameter; /openapi.json
documents the words."""

from __future__ import annotations

import re

import pytest

from pipeline_console.api import filters
from pipeline_console.api.filters import parse_statuses, words_pattern
from pipeline_console.consumers.api import CONSUMER_STATUS_WORDS
from pipeline_console.demo import load_demo
from pipeline_console.errors import InvalidInput

PROBLEM = "application/problem+json"

# (path, parameter, words): every list with a status filter
LISTS = [
    ("/api/v1/deliveries", "status", filters.DELIVERY_STATUS_WORDS),
    ("/api/v1/dlq", "status", filters.DEAD_LETTER_STATUS_WORDS),
    ("/api/v1/ambiguous", "status", filters.AMBIGUOUS_STATUS_WORDS),
    ("/api/v1/anomalies", "status", filters.ANOMALY_STATUS_WORDS),
    ("/api/v1/staging", "status", filters.STAGING_STATUS_WORDS),
    ("/api/v1/replays", "status", filters.REPLAY_STATUS_WORDS),
    ("/api/v1/jobs/runs", "status", filters.JOB_RUN_STATUS_WORDS),
    ("/api/v1/circuits", "state", filters.CIRCUIT_STATE_WORDS),
    ("/api/v1/intake", "status", CONSUMER_STATUS_WORDS),
]
CONSOLE_LISTS = [
    ("/deliveries", "status", filters.DELIVERY_STATUS_WORDS),
    ("/dlq", "status", filters.DEAD_LETTER_STATUS_WORDS),
    ("/ambiguous", "status", filters.AMBIGUOUS_STATUS_WORDS),
    ("/anomalies", "status", filters.ANOMALY_STATUS_WORDS),
    ("/staging", "status", filters.STAGING_STATUS_WORDS),
    ("/replays", "status", filters.REPLAY_STATUS_WORDS),
    ("/circuits", "state", filters.CIRCUIT_STATE_WORDS),
]


class TestParsing:
    def test_several_words_keep_their_order_without_repeats(self):
        assert parse_statuses("held,pending,held", ("pending", "held")) == ("held", "pending")
        assert parse_statuses(None, ("pending",)) is None

    @pytest.mark.parametrize("value", ["bogus", "pending,bogus", "pending,", ",pending", "",
                                       "pending, held", "PENDING"])
    def test_anything_but_known_words_separated_by_commas_is_refused(self, value):
        with pytest.raises(InvalidInput) as refused:
            parse_statuses(value, ("pending", "held"))
        [error] = refused.value.errors
        assert (error.field, error.location) == ("status", "query")
        assert "pending, held" in error.message
        assert re.fullmatch(words_pattern(("pending", "held")), value) is None

    def test_the_documented_pattern_matches_exactly_the_accepted_lists(self):
        pattern = words_pattern(("open", "half_open"))
        for value in ("open", "half_open", "open,half_open", "open,open"):
            assert re.fullmatch(pattern, value)
            assert parse_statuses(value, ("open", "half_open"))


@pytest.fixture
async def demo(database, clock, settings):
    return await load_demo(database, now=clock.now, settings=settings)


async def total(client, url: str) -> int:
    count, cursor = 0, None
    while True:
        response = await client.get(url + "&limit=500" + (f"&cursor={cursor}" if cursor else ""))
        assert response.status_code == 200, (url, response.text)
        body = response.json()
        count += len(body["items"])
        if not (cursor := body["next_cursor"]):
            return count


class TestTheApi:
    async def test_several_statuses_list_the_rows_of_each(self, client, demo):
        for path, name, words in LISTS:
            each = {word: await total(client, f"{path}?{name}={word}") for word in words}
            both = sorted(words, key=lambda word: -each[word])[:2]
            assert await total(client, f"{path}?{name}={','.join(both)}") == (
                each[both[0]] + each[both[1]]), path
            assert await total(client, f"{path}?{name}={','.join(words)}") == sum(
                each.values()), path
            items = (await client.get(f"{path}?{name}={','.join(both)}&limit=500")
                     ).json()["items"]
            assert {item["state" if name == "state" else "status"] for item in items} <= set(
                both), path

    async def test_an_unknown_status_is_a_422_problem_naming_the_parameter(self, client):
        for path, name, words in LISTS:
            response = await client.get(f"{path}?{name}={words[0]},bogus")
            assert response.status_code == 422, path
            assert response.headers["content-type"] == PROBLEM
            body = response.json()
            assert [(e["field"], e["location"]) for e in body["errors"]] == [(name, "query")]
            assert "'bogus'" in body["errors"][0]["message"]

    async def test_openapi_documents_every_status_filter(self, client):
        spec = (await client.get("/openapi.json")).json()
        for path, name, words in LISTS:
            [parameter] = [p for p in spec["paths"][path]["get"]["parameters"]
                           if p["name"] == name]
            assert all(f"`{word}`" in parameter["description"] for word in words), path
            [string] = [s for s in parameter["schema"]["anyOf"] if s["type"] == "string"]
            assert string["pattern"] == words_pattern(words), path
            assert "separated by commas" in parameter["description"]


class TestTheConsole:
    async def test_each_page_takes_the_same_filter_as_the_api(self, client, demo):
        for path, name, words in CONSOLE_LISTS:
            for value in (",".join(words[:2]), "all"):
                response = await client.get(f"{path}?{name}={value}")
                assert response.status_code == 200, (path, response.text[:300])
                assert f"<option selected>{value}</option>" in response.text, path
            refused = await client.get(f"{path}?{name}=bogus")
            assert refused.status_code == 422, path
            assert refused.headers["content-type"].startswith("text/html")
            assert "bogus" in refused.text

        page = (await client.get("/deliveries?status=pending,held,in_flight&limit=500")).text
        statuses = set(re.findall(r"<td>(pending|held|in_flight|delivered|superseded|"
                                  r"dead_lettered|ambiguous)</td>", page))
        assert statuses and statuses <= {"pending", "held", "in_flight"}
