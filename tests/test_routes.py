"""Each route in-process, on both stores: every documented status, the snapshot, the SSE framing.

httpx's ASGITransport answers only when the app returns, so a POST here returns after its whole
run (the simulated source runs with no delays); live streaming is covered end to end."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from lib.cancel_tokens import cancel_token
from lib.config import get_settings
from lib.models import utc_now
from lib.staleness import LOST_AFTER_DEADLINE_SECONDS
from tests.conftest import make_record, run_end
from tests.functions import VercelRouter
from tests.http_helpers import VALID, problem, random_ipv6, sse_events
from tests.store_steps import orphan_run


def field_errors(response: httpx.Response) -> dict[str, str]:
    body = problem(response, 422)
    return {e["field"]: e["message"] for e in body["errors"]}


async def finished_run(api: httpx.AsyncClient, body: dict[str, Any] = VALID) -> str:
    response = await api.post("/api/quotes", json=body)
    assert response.status_code == 202, response.text
    run_id: str = response.json()["runId"]
    await run_end(api, run_id)
    return run_id


# --- POST /api/quotes ------------------------------------------------------------------------


async def test_post_accepts_a_run_and_the_run_completes_with_quotes_cheapest_first(api) -> None:
    response = await api.post("/api/quotes", json=VALID)
    assert response.status_code == 202
    body = response.json()
    run_id = body["runId"]
    assert body == {
        "runId": run_id,
        "status": "processing",
        "statusUrl": f"/api/quotes/{run_id}",
        "streamUrl": f"/api/quotes/{run_id}/stream",
        "cancelToken": cancel_token(get_settings().secret, run_id),
    }
    assert response.headers["location"] == f"/api/quotes/{run_id}"

    snapshot = await run_end(api, run_id)
    assert snapshot["status"] == "completed"
    assert snapshot["progress"] == {"completed": 2, "total": 2, "percent": 100}
    assert [p["provider"] for p in snapshot["providers"]] == ["geico", "progressive"]
    premiums = [q["monthlyPremium"] for q in snapshot["quotes"]]
    assert premiums == sorted(premiums) and len(premiums) == 2
    assert all(q["source"] == "simulated" for q in snapshot["quotes"])
    assert snapshot["lastEventId"] >= 6
    assert snapshot["streamUrl"] == f"/api/quotes/{run_id}/stream"


async def test_the_snapshot_says_what_the_run_priced_without_the_driver(api) -> None:
    body = {
        **VALID,
        "vin": "2c3cdzag2gh967639",
        "zip": "10001-1234",
        "vehicle": {"annualMileage": 8000, "use": "pleasure", "ownership": "leased"},
        "coverage": "full",
        "providers": ["progressive", "geico"],
    }
    run_id = (await api.post("/api/quotes", json=body)).json()["runId"]
    snapshot = (await api.get(f"/api/quotes/{run_id}")).json()
    assert snapshot["priced"] == {
        "vinEnding": "967639",
        "zip": "10001-1234",
        "vehicle": {"annualMileage": 8000, "use": "pleasure", "ownership": "leased"},
        "coverage": "full",
        "providers": ["geico", "progressive"],  # the run's order, as its providers list
    }
    text = json.dumps(snapshot)
    assert "2C3CDZAG2GH967639" not in text.upper()
    assert "Ana" not in text and "Lee" not in text and "1990-04-12" not in text

    defaults = (await api.post("/api/quotes", json={**VALID, "vehicle": None})).json()["runId"]
    priced = (await api.get(f"/api/quotes/{defaults}")).json()["priced"]
    assert priced["vehicle"] == {"annualMileage": 12000, "use": "commute", "ownership": "owned"}


async def test_run_events_follow_the_contract_from_started_to_complete(api) -> None:
    run_id = await finished_run(api, {**VALID, "providers": None})
    events = (await api.get(f"/api/quotes/{run_id}?since=-1&limit=1000")).json()["events"]
    assert [e["id"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "started"
    assert events[0]["total"] == 5
    assert events[-1]["type"] == "complete"
    assert [e["type"] for e in events].count("complete") == 1
    progress = [e for e in events if e["type"] == "progress"]
    assert [p["completed"] for p in progress] == [1, 2, 3, 4, 5]
    assert progress[-1]["percent"] == 100
    outcomes = [e for e in events if e["type"] in ("quote", "provider_error")]
    assert len(outcomes) == 5
    complete = events[-1]
    quoted = [q["monthlyPremium"] for q in complete["quotes"]]
    assert quoted == sorted(quoted)
    assert complete["best"] == (complete["quotes"][0]["provider"] if quoted else None)


async def test_personal_data_is_not_in_responses_or_storage(api, store_kind, tmp_path) -> None:
    run_id = await finished_run(api)
    snapshot = (await api.get(f"/api/quotes/{run_id}?since=-1")).text
    stream = (await api.get(f"/api/quotes/{run_id}/stream")).text
    for text in (snapshot, stream):
        assert "Ana" not in text and "Lee" not in text and "1990-04-12" not in text
    if store_kind == "sqlite":
        stored = (tmp_path / "quotes.sqlite3").read_bytes()
        for wal in tmp_path.glob("quotes.sqlite3-wal"):
            stored += wal.read_bytes()
        assert b"1990-04-12" not in stored and b'"Ana"' not in stored
        assert b"2C3CDZAG2GH967639" not in stored and b"967639" in stored


async def test_other_methods_are_405_with_allow(api) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = await api.request(method, "/api/quotes")
        problem(response, 405)
        assert response.headers["allow"] == "POST, OPTIONS"
    response = await api.post("/api/quotes/" + "a" * 22)
    problem(response, 405)
    assert response.headers["allow"] == "GET, DELETE, OPTIONS"


async def test_non_json_content_type_is_415(api) -> None:
    response = await api.post(
        "/api/quotes", content=json.dumps(VALID), headers={"content-type": "text/plain"}
    )
    problem(response, 415)
    missing = await api.post("/api/quotes", content=json.dumps(VALID))
    problem(missing, 415)


async def test_json_suffix_and_charset_are_accepted(api) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.quote+json"):
        response = await api.post(
            "/api/quotes", content=json.dumps(VALID), headers={"content-type": content_type}
        )
        assert response.status_code == 202, content_type


async def test_body_over_16_kib_is_413(api) -> None:
    padded = {**VALID, "padding": "x" * 17000}
    problem(await api.post("/api/quotes", json=padded), 413)


async def test_malformed_json_is_400(api) -> None:
    response = await api.post(
        "/api/quotes", content=b'{"vin": ', headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in problem(response, 400)["detail"]


@pytest.mark.parametrize(
    "body",
    [b"[" * 10000, b'{"vin": "\xff\xfe"}', b"\xef\xbb\xbf{}", b"", b"{} {}", b"NaN"],
    ids=["deep", "bad-utf8", "bom", "empty", "two-values", "nan"],
)
async def test_hostile_bodies_are_a_clear_problem_never_a_500(api, body) -> None:
    response = await api.post(
        "/api/quotes", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code in (400, 422), response.text
    problem(response, response.status_code)


async def test_checks_run_in_the_documented_order(api) -> None:
    big_text = b"x" * 20000
    assert (await api.put("/api/quotes", content=big_text)).status_code == 405
    response = await api.post("/api/quotes", content=big_text, headers={"content-type": "text/x"})
    assert response.status_code == 415
    response = await api.post(
        "/api/quotes", content=big_text, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    response = await api.post(
        "/api/quotes", content=b"{bad", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"vin": "2C3CDZAG7GH967639"}, "vin", "check digit is 7, expected 2"),
        ({"vin": "2C3CDZAG2GH96763"}, "vin", "must be 17 characters, got 16"),
        ({"vin": "2C3CDZAG2GHI67639"}, "vin", "must not contain the letters I, O or Q (found I)"),
        ({"zip": "9410"}, "zip", "must be a US ZIP code: 12345 or 12345-6789"),
        ({"zip": "\u0669\u0664\u0661\u0660\u0667"}, "zip", "must be a US ZIP code"),
        ({"coverage": "platinum"}, "coverage", "must be one of minimum, standard or full"),
        ({"providers": []}, "providers", "must name at least one provider"),
        ({"providers": ["geico", "acme"]}, "providers.1", "unknown provider 'acme'"),
        ({"providers": ["geico", "geico"]}, "providers", "'geico' is listed twice"),
        ({"color": "red"}, "color", "is not a known field"),
        ({"vehicle": {"annualMileage": 150001}}, "vehicle.annualMileage", "150000"),
        ({"vehicle": {"use": "racing"}}, "vehicle.use", "must be one of"),
        ({"vehicle": {"wheels": 4}}, "vehicle.wheels", "is not a known field"),
    ],
)
async def test_invalid_fields_are_422_and_named(api, change, field, message) -> None:
    errors = field_errors(await api.post("/api/quotes", json={**VALID, **change}))
    assert field in errors, errors
    assert message in errors[field]


@pytest.mark.parametrize(
    ("driver", "field", "message"),
    [
        ({"dateOfBirth": "1990-13-01"}, "driver.dateOfBirth", "ISO date"),
        ({"firstName": "   "}, "driver.firstName", "1 to 64 characters"),
        ({"lastName": "- . '"}, "driver.lastName", "must contain a letter"),
        ({"lastName": "1234"}, "driver.lastName", "may contain only letters"),
        ({"firstName": "Ana\n{buy it}"}, "driver.firstName", "may contain only letters"),
        ({"lastName": "x" * 65}, "driver.lastName", "1 to 64 characters"),
        ({"middleName": "Q"}, "driver.middleName", "is not a known field"),
    ],
)
async def test_invalid_driver_fields_are_422_and_named(api, driver, field, message) -> None:
    body = {**VALID, "driver": {**VALID["driver"], **driver}}
    errors = field_errors(await api.post("/api/quotes", json=body))
    assert message in errors[field]


async def test_driver_age_must_be_16_to_100_today(api) -> None:
    today = utc_now().date()
    too_young = today.replace(year=today.year - 15).isoformat()
    body = {**VALID, "driver": {**VALID["driver"], "dateOfBirth": too_young}}
    errors = field_errors(await api.post("/api/quotes", json=body))
    assert "16 to 100 years old" in errors["driver.dateOfBirth"]
    sixteen = today.replace(year=today.year - 16).isoformat()
    body = {**VALID, "driver": {**VALID["driver"], "dateOfBirth": sixteen}}
    assert (await api.post("/api/quotes", json=body)).status_code == 202


async def test_every_invalid_field_is_reported_at_once(api) -> None:
    body = {"vin": "x", "zip": "y", "extra": 1}
    response = await api.post("/api/quotes", json=body)
    errors = field_errors(response)
    assert set(errors) == {"vin", "zip", "driver", "extra"}
    assert response.json()["detail"] == "4 fields are invalid"


async def test_json_that_is_not_an_object_is_422(api) -> None:
    for body in ([VALID], "hello", 3, None):
        response = await api.post(
            "/api/quotes", content=json.dumps(body), headers={"content-type": "application/json"}
        )
        problem(response, 422)


async def test_null_optional_fields_mean_absent_and_vin_is_normalised(api) -> None:
    body = {**VALID, "vin": VALID["vin"].lower(), "vehicle": None, "coverage": None}
    body["providers"] = None
    response = await api.post("/api/quotes", json=body)
    assert response.status_code == 202
    snapshot = (await api.get(response.headers["location"])).json()
    assert snapshot["progress"]["total"] == 5


async def test_same_idempotency_key_and_body_returns_the_same_run_with_200(api) -> None:
    headers = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    first = await api.post("/api/quotes", json=VALID, headers=headers)
    # Key order and VIN case do not change the normalised body.
    second = await api.post(
        "/api/quotes",
        json={**dict(reversed(list(VALID.items()))), "vin": VALID["vin"].lower()},
        headers=headers,
    )
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json() == first.json()
    assert second.headers["location"] == first.headers["location"]


async def test_same_idempotency_key_with_another_body_is_422(api) -> None:
    headers = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    await api.post("/api/quotes", json=VALID, headers=headers)
    response = await api.post("/api/quotes", json={**VALID, "zip": "10001"}, headers=headers)
    assert problem(response, 422)["type"].endswith("/idempotency-key-reused")


async def test_malformed_idempotency_key_is_400(api) -> None:
    for key in (b"", b"has space", b"x" * 256, "é".encode()):
        response = await api.post(
            "/api/quotes",
            content=json.dumps(VALID).encode(),
            headers=[(b"content-type", b"application/json"), (b"idempotency-key", key)],
        )
        problem(response, 400)


@pytest.mark.parametrize("store_kind", ["sqlite"])  # a deployment with no KV configured
async def test_deployed_on_vercel_without_kv_is_503_with_a_clear_detail(
    configure, fresh_instance
) -> None:
    configure(VERCEL="1", VERCEL_ENV="production")
    api = fresh_instance()
    body = problem(await api.post("/api/quotes", json=VALID), 503)
    assert "KV" in body["detail"]
    problem(await api.get("/api/quotes/" + "a" * 22), 503)


@pytest.mark.parametrize("store_kind", ["sqlite"])  # a deployment with no KV configured
async def test_vercel_dev_without_kv_uses_the_embedded_store(configure, fresh_instance) -> None:
    configure(VERCEL="1", VERCEL_ENV="development")
    api = fresh_instance()
    assert (await api.post("/api/quotes", json=VALID)).status_code == 202


async def test_unreachable_storage_is_503_with_retry_after(configure, fresh_instance) -> None:
    configure(KV_REST_API_URL="http://127.0.0.1:9", KV_REST_API_TOKEN="t")
    api = fresh_instance()
    response = await api.post("/api/quotes", json=VALID)
    problem(response, 503)
    assert response.headers["retry-after"] == "2"
    response = await api.get("/api/quotes/" + "b" * 22)
    problem(response, 503)


async def test_an_unexpected_failure_is_a_500_problem_without_a_traceback(api, monkeypatch) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internals /srv/app.py line 3")

    monkeypatch.setattr("lib.store.sqlite.SQLiteStore.get_run", broken)
    monkeypatch.setattr("lib.store.kv.KVStore.get_run", broken)
    response = await api.get("/api/quotes/" + "c" * 22)
    body = problem(response, 500)
    assert "secret internals" not in response.text and "Traceback" not in response.text
    assert body["detail"] == "The server failed to handle the request."


async def test_too_many_runs_from_one_address_is_429_with_retry_after(
    configure, fresh_instance
) -> None:
    configure(QUOTE_RATE_LIMIT_PER_MINUTE="2")
    # Unique per test run: the KV store outlives the test session within the minute.
    api = fresh_instance(client=(random_ipv6(), 5000))
    statuses = [(await api.post("/api/quotes", json=VALID)) for _ in range(3)]
    assert [r.status_code for r in statuses] == [202, 202, 429]
    limited = problem(statuses[2], 429)
    assert limited["type"].endswith("/rate-limited")
    # The sliding estimate weighs the previous minute in: a wait can reach into the next one.
    assert 1 <= int(statuses[2].headers["retry-after"]) <= 120
    another = fresh_instance(client=(random_ipv6(), 5000))
    assert (await another.post("/api/quotes", json=VALID)).status_code == 202


# --- CORS -------------------------------------------------------------------------------------


async def test_cors_preflight_allows_the_documented_headers(api) -> None:
    response = await api.options(
        "/api/quotes",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "https://app.example")
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "idempotency-key" in allowed and "last-event-id" in allowed
    assert "authorization" in allowed


async def test_cors_exposes_location_and_respects_the_allow_list(
    api, configure, fresh_instance
) -> None:
    response = await api.post("/api/quotes", json=VALID, headers={"Origin": "https://a.example"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "location" in response.headers["access-control-expose-headers"].lower()

    configure(CORS_ALLOW_ORIGINS="https://good.example")
    allow_listed = fresh_instance()
    good = await allow_listed.post(
        "/api/quotes", json=VALID, headers={"Origin": "https://good.example"}
    )
    assert good.headers["access-control-allow-origin"] == "https://good.example"
    bad = await allow_listed.options(
        "/api/quotes",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert bad.status_code == 400
    assert "access-control-allow-origin" not in bad.headers


# --- GET /api/quotes/{runId} -------------------------------------------------------------------


async def test_malformed_run_ids_are_404_without_touching_storage(
    configure, fresh_instance
) -> None:
    configure(KV_REST_API_URL="http://127.0.0.1:9", KV_REST_API_TOKEN="t")
    api = fresh_instance()
    for run_id in ("short", "x" * 23, "a" * 21 + "!", "%20" * 8):
        problem(await api.get(f"/api/quotes/{run_id}"), 404)
        problem(await api.get(f"/api/quotes/{run_id}/stream"), 404)


async def test_unknown_run_is_404(api) -> None:
    problem(await api.get("/api/quotes/" + "Z" * 22), 404)
    problem(await api.get("/api/quotes/" + "Z" * 22 + "/stream"), 404)


async def test_since_and_limit_page_through_events(api) -> None:
    run_id = await finished_run(api)
    response = await api.get(f"/api/quotes/{run_id}?since=2&limit=3")
    assert [e["id"] for e in response.json()["events"]] == [3, 4, 5]
    plain = (await api.get(f"/api/quotes/{run_id}")).json()
    assert "events" not in plain


async def test_a_running_runs_snapshot_is_never_stored(api, configured_store) -> None:
    record = make_record()
    await configured_store.create_run(record)
    for path in (f"/api/quotes/{record.run_id}", f"/api/quotes/{record.run_id}?since=-1"):
        response = await api.get(path)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        assert "etag" not in response.headers


async def test_a_finished_runs_snapshot_is_cached_until_it_expires_and_revalidates_to_304(
    api, configure
) -> None:
    run_id = await finished_run(api)
    ttl = get_settings().run_ttl_seconds
    tags = set()
    for path in (f"/api/quotes/{run_id}", f"/api/quotes/{run_id}?since=2&limit=3"):
        response = await api.get(path)
        assert response.status_code == 200
        expires = datetime.fromisoformat(response.json()["expiresAt"])
        left = (expires - datetime.now(UTC)).total_seconds()
        cache = response.headers["cache-control"]
        assert cache.startswith("public, max-age=0, s-maxage="), cache
        assert left - 5 <= int(cache.rsplit("=", 1)[1]) <= min(left, ttl)
        etag = response.headers["etag"]
        assert etag.startswith('"') and not etag.startswith("W/"), "a strong ETag"
        tags.add(etag)
        again = await api.get(path)
        assert again.headers["etag"] == etag and again.content == response.content
        for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
            revalidated = await api.get(path, headers={"If-None-Match": header})
            assert revalidated.status_code == 304, header
            assert revalidated.content == b""
            assert revalidated.headers["etag"] == etag
            assert revalidated.headers["cache-control"] == cache
        changed = await api.get(path, headers={"If-None-Match": '"something-else"'})
        assert changed.status_code == 200 and changed.content == response.content
    assert len(tags) == 2, "a page of events is its own representation"


@pytest.mark.parametrize(
    "query",
    ["since=abc", "since=-2", "since=1.5", "since=1_0", "since=%D9%A1", "limit=0", "limit=1001"],
)
async def test_malformed_since_or_limit_is_400(api, query) -> None:
    run_id = await finished_run(api)
    problem(await api.get(f"/api/quotes/{run_id}?{query}"), 400)


# --- stale runs --------------------------------------------------------------------------------


async def test_a_run_whose_work_is_lost_is_finalized_worker_lost_once(
    api, configured_store
) -> None:
    run_id = await orphan_run(configured_store, past_deadline=LOST_AFTER_DEADLINE_SECONDS + 5)
    snapshots = await asyncio.gather(*(api.get(f"/api/quotes/{run_id}") for _ in range(5)))
    for response in snapshots:
        body = response.json()
        assert body["status"] == "failed"
        assert body["error"]["code"] == "worker_lost"
        assert all(p["error"]["code"] == "worker_lost" for p in body["providers"])
    events = (await api.get(f"/api/quotes/{run_id}?since=-1")).json()["events"]
    assert [e["type"] for e in events] == ["started", "activity", "error"]


async def test_a_run_just_past_its_deadline_is_left_to_its_deadline_message(
    api, configured_store
) -> None:
    run_id = await orphan_run(configured_store, past_deadline=1)
    body = (await api.get(f"/api/quotes/{run_id}")).json()
    assert body["status"] == "processing"


async def test_a_stream_of_a_run_whose_work_is_lost_ends_with_worker_lost(
    api, configured_store
) -> None:
    # Lost 1 s from now: the stream is open by then and ends the run itself.
    run_id = await orphan_run(configured_store, past_deadline=LOST_AFTER_DEADLINE_SECONDS - 1)
    stream = await asyncio.wait_for(api.get(f"/api/quotes/{run_id}/stream"), timeout=10)
    events = sse_events(stream.text)
    assert [e["type"] for e in events] == ["started", "activity", "error"]
    assert events[-1]["code"] == "worker_lost"


# --- GET /api/quotes/{runId}/stream -------------------------------------------------------------


async def test_stream_replays_a_finished_run_byte_for_byte(api) -> None:
    run_id = await finished_run(api)
    events = (await api.get(f"/api/quotes/{run_id}?since=-1&limit=1000")).json()["events"]
    response = await api.get(f"/api/quotes/{run_id}/stream")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache, no-transform"
    assert response.headers["x-accel-buffering"] == "no"
    expected = "retry: 2000\n\n" + "".join(
        f"id: {e['id']}\ndata: {json.dumps(e, separators=(',', ':'), ensure_ascii=False)}\n\n"
        for e in events
    )
    assert response.text == expected
    assert "event:" not in response.text


async def test_stream_resumes_after_last_event_id_and_the_header_wins(api) -> None:
    run_id = await finished_run(api)
    url = f"/api/quotes/{run_id}/stream"
    by_header = sse_events((await api.get(url, headers={"Last-Event-ID": "3"})).text)
    by_query = sse_events((await api.get(url + "?lastEventId=5")).text)
    both = sse_events((await api.get(url + "?lastEventId=5", headers={"Last-Event-ID": "2"})).text)
    empty_header = sse_events((await api.get(url, headers={"Last-Event-ID": ""})).text)
    assert by_header[0]["id"] == 4
    assert by_query[0]["id"] == 6
    assert both[0]["id"] == 3
    assert empty_header[0]["id"] == 0


async def test_stream_of_a_terminal_run_with_nothing_after_the_cursor_is_204(api) -> None:
    run_id = await finished_run(api)
    last = (await api.get(f"/api/quotes/{run_id}")).json()["lastEventId"]
    response = await api.get(f"/api/quotes/{run_id}/stream", headers={"Last-Event-ID": str(last)})
    assert response.status_code == 204
    assert response.content == b""


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.0", "1e3", "1_0", "%D9%A1", "+1", ""])
async def test_malformed_cursor_is_400(api, cursor) -> None:
    run_id = await finished_run(api)
    response = await api.get(f"/api/quotes/{run_id}/stream?lastEventId={cursor}")
    problem(response, 400)


async def test_malformed_query_cursor_is_400_even_beside_a_valid_header(api) -> None:
    run_id = (await api.post("/api/quotes", json=VALID)).json()["runId"]
    url = f"/api/quotes/{run_id}/stream?lastEventId=-7"
    problem(await api.get(url, headers={"Last-Event-ID": "2"}), 400)


async def test_stream_closes_itself_at_stream_max_seconds(
    configured_store, configure, fresh_instance
) -> None:
    configure(STREAM_MAX_SECONDS="1", RUN_LEASE_SECONDS="60")
    api = fresh_instance()
    run_id = await orphan_run(configured_store, past_deadline=-200)
    started = asyncio.get_running_loop().time()
    response = await asyncio.wait_for(api.get(f"/api/quotes/{run_id}/stream"), timeout=10)
    elapsed = asyncio.get_running_loop().time() - started
    assert [e["id"] for e in sse_events(response.text)] == [0, 1]
    assert 0.9 <= elapsed < 4


async def test_stream_closes_five_seconds_before_the_invocation_deadline(
    configured_store, configure, fresh_instance
) -> None:
    from vercel_runtime.deadline import reset_deadline, set_deadline

    configure(STREAM_MAX_SECONDS="", RUN_LEASE_SECONDS="60")
    api = fresh_instance()
    run_id = await orphan_run(configured_store, past_deadline=-200)
    deadline = (utc_now() + timedelta(seconds=6.5)).isoformat().replace("+00:00", "Z")
    token = set_deadline(deadline)  # what Vercel's runtime does with x-vercel-internal-deadline
    try:
        started = asyncio.get_running_loop().time()
        response = await asyncio.wait_for(api.get(f"/api/quotes/{run_id}/stream"), timeout=10)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        reset_deadline(token)
    assert [e["id"] for e in sse_events(response.text)] == [0, 1]
    assert 1.0 <= elapsed < 3.5


async def test_an_idle_stream_sends_keep_alive_comments(
    configured_store, configure, fresh_instance
) -> None:
    configure(STREAM_MAX_SECONDS="1.2", RUN_LEASE_SECONDS="60")
    router = VercelRouter()
    router.modules["stream"].KEEP_ALIVE_SECONDS = 0.25
    api = fresh_instance(router)
    run_id = await orphan_run(configured_store, past_deadline=-200)
    text = (await api.get(f"/api/quotes/{run_id}/stream", headers={"Last-Event-ID": "1"})).text
    assert text.startswith("retry: 2000\n\n: keep-alive\n\n")
    assert 3 <= text.count(": keep-alive\n\n") <= 6
    assert "data:" not in text


# --- dispatch to the queue ----------------------------------------------------------------------


async def test_without_a_queue_post_is_503_and_starts_nothing(api, configure) -> None:
    configure(VERCEL_QUEUE_BASE_URL="")
    body = problem(await api.post("/api/quotes", json=VALID), 503)
    assert body["type"].endswith("/queue-not-configured")
    assert "VERCEL_QUEUE_BASE_URL" in body["detail"]


async def test_an_unreachable_queue_is_503_and_leaves_no_run_processing(
    api, configure, queue_env, monkeypatch
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    headers = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    monkeypatch.setenv("VERCEL_QUEUE_BASE_URL", f"http://127.0.0.1:{port}")
    configure()
    from vercel.queue.testing import reset_default_queue_clients

    reset_default_queue_clients()
    response = await api.post("/api/quotes", json=VALID, headers=headers)
    body = problem(response, 503)
    assert body["type"].endswith("/queue-unavailable")
    assert response.headers["retry-after"] == "5"

    # The same key, once the queue is back, starts a run: the refused one was forgotten.
    monkeypatch.setenv("VERCEL_QUEUE_BASE_URL", queue_env.base_url)
    configure()
    reset_default_queue_clients()
    retried = await api.post("/api/quotes", json=VALID, headers=headers)
    assert retried.status_code == 202
    assert (await run_end(api, retried.json()["runId"]))["status"] == "completed"
