"""api/work.py takes Vercel Queues push deliveries through the SDK: in process, against the SDK's
embedded queue service over HTTP (what `make dev` runs), with the headers a push carries."""

from __future__ import annotations

import logging
from datetime import timedelta

import httpx
import pytest

from lib.config import get_settings
from lib.models import utc_now
from lib.queue.messages import RunDeadlineMessage, seal
from tests.functions import load_function

TOPIC = "quote-provider-work"
CONSUMER = "api_Swork_Dpy"  # Vercel's sanitized function path, as a push names it


def _client() -> httpx.AsyncClient:
    app = load_function("api/work.py").app
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker")


async def test_a_push_delivery_reaches_the_subscriber_and_is_acknowledged(
    embedded_queue: object,
) -> None:
    from vercel.queue import QueueClient

    server = embedded_queue
    # A run's deadline for a run that does not exist: read, found gone, and acknowledged.
    sealed = seal(
        RunDeadlineMessage(run_id="r1", deadline=utc_now() - timedelta(seconds=1)),
        get_settings().secret,
    )
    message_id = await QueueClient().send(TOPIC, sealed)
    deliveries = list(server.iter_push_deliveries(TOPIC, CONSUMER, region="dev1"))  # type: ignore[attr-defined]
    assert [d.headers["ce-vqsmessageid"] for d in deliveries] == [message_id]

    async with _client() as client:
        response = await client.post(
            "/api/work", content=deliveries[0].body, headers=deliveries[0].headers
        )

    assert response.status_code == 204, response.text
    stored = server.state.by_id[message_id]  # type: ignore[attr-defined]
    assert stored.acknowledged_for(CONSUMER)


@pytest.mark.parametrize(
    "headers",
    [{}, {"ce-type": "com.vercel.queue.v2beta"}, {"ce-type": "something.else"}],
    ids=["no-cloud-event", "no-vqs-headers", "other-event-type"],
)
async def test_a_request_that_is_not_a_queue_delivery_is_a_400_problem(
    embedded_queue: object, headers: dict[str, str]
) -> None:
    async with _client() as client:
        response = await client.post("/api/work", content=b"{}", headers=headers)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/not-a-queue-delivery")


@pytest.mark.parametrize(
    "payload",
    [
        {"kind": "deadline", "runId": "r1", "deadline": "2020-01-01T00:00:00Z"},
        {
            "message": '{"kind":"deadline","runId":"r1","deadline":"2020-01-01T00:00:00Z"}',
            "seal": "0" * 64,
        },
    ],
    ids=["unsealed", "forged-seal"],
)
async def test_a_delivery_the_queue_did_not_send_is_refused_401_before_any_work(
    embedded_queue: object,
    payload: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vercel.queue import QueueClient

    server = embedded_queue
    module = load_function("api/work.py")

    def no_store() -> None:
        raise AssertionError("the store was reached for a forged delivery")

    monkeypatch.setattr(type(module.app.context), "store", property(lambda _: no_store()))
    message_id = await QueueClient().send(TOPIC, payload)
    deliveries = list(server.iter_push_deliveries(TOPIC, CONSUMER, region="dev1"))  # type: ignore[attr-defined]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=module.app), base_url="http://worker"
    ) as client:
        with caplog.at_level(logging.WARNING):
            response = await client.post(
                "/api/work", content=deliveries[0].body, headers=deliveries[0].headers
            )

    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/unsealed-delivery")
    assert any("did not send" in r.getMessage() for r in caplog.records)
    assert not server.state.by_id[message_id].acknowledged_for(CONSUMER)  # type: ignore[attr-defined]


async def test_a_push_with_a_malformed_header_is_a_400_not_a_500(embedded_queue: object) -> None:
    from vercel.queue import QueueClient

    server = embedded_queue
    await QueueClient().send(TOPIC, {"anything": 1})
    delivery = next(iter(server.iter_push_deliveries(TOPIC, CONSUMER, region="dev1")))  # type: ignore[attr-defined]
    headers = {**delivery.headers, "ce-vqsregion": "not a region!"}
    async with _client() as client:
        response = await client.post("/api/work", content=delivery.body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["type"].endswith("/not-a-queue-delivery")


async def test_a_working_delivery_holds_its_message_for_a_run_lease_not_the_pushs_300_s(
    embedded_queue: object, tmp_path: object
) -> None:
    """Where the platform honours visibility alone, a delivery whose instance died comes back
    when its hold ends: about RUN_LEASE_SECONDS (30 s, the SDK's least), not maxDuration."""
    import asyncio

    from vercel.queue import QueueClient

    from lib.config import settings_from_env
    from lib.http import FunctionContext
    from lib.queue.messages import ProviderWorkMessage
    from lib.workflow import new_run_record
    from tests.worker_inputs import REQUEST

    server = embedded_queue
    module = load_function("api/work.py")
    settings = settings_from_env(
        {
            "QUOTES_DB_PATH": f"{tmp_path}/q.sqlite3",
            "SIMULATED_MIN_SECONDS": "1",
            "SIMULATED_DELAY_SCALE": "0",
            "RUN_LEASE_SECONDS": "30",
        }
    )
    module.app._context = FunctionContext(settings)
    deadline = utc_now() + timedelta(seconds=120)
    await module.app.context.store.create_run(new_run_record("r1", REQUEST, ["geico"], deadline))
    work = ProviderWorkMessage(
        run_id="r1", provider="geico", total=1, deadline=deadline, request=REQUEST
    )
    message_id = await QueueClient().send(TOPIC, seal(work, settings.secret))
    (push,) = server.iter_push_deliveries(TOPIC, CONSUMER, region="dev1", lease_seconds=300)  # type: ignore[attr-defined]
    stored = server.state.by_id[message_id]  # type: ignore[attr-defined]
    pushed_for = (stored.lease_deadline_by_consumer[CONSUMER] - utc_now()).total_seconds()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=module.app), base_url="http://worker"
    ) as client:
        posting = asyncio.create_task(
            client.post("/api/work", content=push.body, headers=push.headers)
        )
        held_for: list[float] = []
        for _ in range(100):
            await asyncio.sleep(0.02)
            held_for.append(
                (stored.lease_deadline_by_consumer[CONSUMER] - utc_now()).total_seconds()
            )
            if held_for[-1] < 60:
                break
        response = await posting
    assert response.status_code == 204, response.text
    assert pushed_for > 200  # the push's own lease
    # The worker's hold, within the agent's 1 s of work (the queue service's deadline and this
    # test's clock are two readings: CI saw 30.0004 s).
    assert 25 < held_for[-1] <= 30.05
    assert stored.acknowledged_for(CONSUMER)
