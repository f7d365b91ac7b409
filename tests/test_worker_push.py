"""api/work.py takes Vercel Queues push deliveries through the SDK: in process, against the SDK's
embedded queue service over HTTP (what `make dev` runs), with the headers a push carries."""

from __future__ import annotations

import httpx
import pytest

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
    message_id = await QueueClient().send(TOPIC, {"runId": "r1", "provider": "geico"})
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
