"""Vercel Queues on the dev host, end to end: the SDK's embedded queue service started by the
host, messages sent with the SDK (from this process and from a function), and pushed to
queue-triggered worker functions in their own processes the way Vercel pushes them.

The test project's workers record every push and every handler run to a file; each message's
payload says what its handler does on each delivery (succeed, raise, `RetryAfter(1)`, hang, or
wait for other deliveries to be in flight at the same time).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from vercel.queue import ALL_DEPLOYMENTS, QueueClient

from tools.devhost import RunningDevHost, start_devhost_process
from tools.devhost.queues import QueueConfigError, discover_triggers
from tools.devhost.routes import discover_functions

pytestmark = pytest.mark.e2e

WORKER = """\
import asyncio, json, os, time
from pathlib import Path
from vercel.queue import Message, RetryAfter, accept_and_handle, subscribe
from vercel_runtime import get_deadline

LOG = Path(os.environ["DELIVERY_LOG"])

def record(**fields):
    with LOG.open("a") as log:  # one short O_APPEND write per line: whole lines
        log.write(json.dumps({"pid": os.getpid(), "t": time.time(), **fields}) + "\\n")

def records():
    return [json.loads(line) for line in LOG.read_text().splitlines()]

@subscribe(topic="TOPIC", consumer_group="FILE")
async def handle(message: Message) -> None:
    meta, payload = message.metadata, message.payload
    script = payload["script"]
    action = script[min(meta.delivery_count, len(script)) - 1]
    record(event="start", id=meta.message_id, delivery=meta.delivery_count,
           tag=payload["tag"], action=action)
    if action == "raise":
        raise RuntimeError("this delivery fails")
    if action == "retry-after-1":
        raise RetryAfter(1)
    if action == "hang":
        await asyncio.sleep(30)
    if action.startswith("together:"):  # return once this many deliveries of the tag started
        count = int(action.split(":")[1])
        for _ in range(400):
            if len({r["id"] for r in records() if r.get("tag") == payload["tag"]}) >= count:
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the other deliveries never arrived")
    record(event="end", id=meta.message_id, delivery=meta.delivery_count, tag=payload["tag"])

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    deadline = get_deadline()
    env = {name: os.environ.get(name)
           for name in ("VERCEL_QUEUE_BASE_URL", "VERCEL_QUEUE_TOKEN", "VERCEL_REGION")}
    record(event="push", headers=headers, env=env,
           deadline=deadline.isoformat() if deadline else None)
    try:
        await accept_and_handle(body, headers)
        status = 204
    except Exception:
        status = 500
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})
"""

ENQUEUE = """\
import itertools
import json
from vercel.queue import send

async def app(scope, receive, send_asgi):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = json.loads(body)
    message_id = await send(request["topic"], request["payload"],
                            idempotency_key=request.get("key"), delay=request.get("delay"))
    await send_asgi({"type": "http.response.start", "status": 200,
                     "headers": [(b"content-type", b"application/json")]})
    await send_asgi({"type": "http.response.body",
                     "body": json.dumps({"messageId": message_id}).encode()})
"""

WORKER_MAX_DURATION = 4
VERCEL_JSON = {
    "functions": {
        "api/worker.py": {
            "maxDuration": WORKER_MAX_DURATION,
            "experimentalTriggers": [
                {
                    "type": "queue/v2beta",
                    "topic": "jobs",
                    "retryAfterSeconds": 1,
                    "maxDeliveries": 3,
                }
            ],
        },
        # A long retryAfterSeconds: a redelivery well before it can only be RetryAfter's.
        "api/patient.py": {
            "maxDuration": 30,
            "experimentalTriggers": [
                {"type": "queue/v2beta", "topic": "later", "retryAfterSeconds": 120}
            ],
        },
    }
}
CONSUMER = {"jobs": "api_Sworker_Dpy", "later": "api_Spatient_Dpy"}


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deliveries") / "deliveries.jsonl"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, log_path: Path) -> Iterator[RunningDevHost]:
    root = tmp_path_factory.mktemp("queue-project")
    files = {
        "api/worker.py": WORKER.replace("TOPIC", "jobs").replace("FILE", "api/worker.py"),
        "api/patient.py": WORKER.replace("TOPIC", "later").replace("FILE", "api/patient.py"),
        "api/enqueue.py": ENQUEUE,
        "vercel.json": json.dumps(VERCEL_JSON),
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    log_path.touch()
    with start_devhost_process(root, instances=2, env={"DELIVERY_LOG": str(log_path)}) as running:
        yield running


@pytest.fixture
def queue(host: RunningDevHost) -> QueueClient:
    assert host.queue_url.startswith("http://127.0.0.1:"), host.output()
    return QueueClient(
        token="vc-dev-token", region="dev1", base_url=host.queue_url, deployment=ALL_DEPLOYMENTS
    )


def _records(log_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line]


def _wait_for(
    log_path: Path,
    host: RunningDevHost,
    what: str,
    found: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 30,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = _records(log_path)
        if found(records):
            return records
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout:g} s; host output:\n{host.output()[-6000:]}")


def _runs(records: list[dict[str, Any]], tag: str, event: str = "start") -> list[dict[str, Any]]:
    return [r for r in records if r.get("tag") == tag and r["event"] == event]


def _settled(host: RunningDevHost, topic: str, message_id: str) -> int:
    """The queue's answer when the message is asked for by id: 410 once it is acknowledged."""
    response = httpx.post(
        f"{host.queue_url}/api/v3/topic/{topic}/consumer/{CONSUMER[topic]}/id/{message_id}",
        headers={"Authorization": "Bearer vc-dev-token", "Accept": "multipart/mixed"},
    )
    return response.status_code


def _wait_settled(host: RunningDevHost, topic: str, message_id: str) -> None:
    deadline = time.monotonic() + 15
    while (status := _settled(host, topic, message_id)) != 410:
        assert time.monotonic() < deadline, f"{message_id} not settled ({status}):\n{host.output()}"
        time.sleep(0.1)


def _tag() -> str:
    return uuid.uuid4().hex[:12]


async def test_a_message_sent_with_the_sdk_is_pushed_with_vercels_headers_and_acknowledged(
    host: RunningDevHost, queue: QueueClient, log_path: Path
) -> None:
    tag = _tag()
    sent_at = time.time()
    message_id = await queue.send("jobs", {"tag": tag, "script": ["ok"]})
    assert message_id

    records = _wait_for(log_path, host, "handled delivery", lambda r: bool(_runs(r, tag, "end")))
    (start,) = _runs(records, tag)
    assert (start["id"], start["delivery"]) == (message_id, 1)
    push = next(
        r
        for r in records
        if r["event"] == "push" and r["headers"].get("ce-vqsmessageid") == message_id
    )
    headers = push["headers"]
    assert headers["ce-type"] == "com.vercel.queue.v2beta"
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-vqsqueuename"] == "jobs"
    assert headers["ce-vqsconsumergroup"] == "api_Sworker_Dpy"  # Vercel's sanitized file path
    assert headers["ce-vqsdeliverycount"] == "1"
    assert headers["ce-vqsreceipthandle"]
    assert headers["ce-vqsregion"] == "dev1"
    assert headers["content-type"] == "application/json"
    created = datetime.fromisoformat(headers["ce-vqscreatedat"]).timestamp()
    assert sent_at - 5 < created <= push["t"]
    assert datetime.fromisoformat(headers["ce-vqsvisibilitydeadline"]).timestamp() > created
    # The invocation's limit is the function's maxDuration, as on Vercel.
    assert push["deadline"] is not None
    remaining = datetime.fromisoformat(push["deadline"]).timestamp() - push["t"]
    assert 0 < remaining <= WORKER_MAX_DURATION + 1
    assert push["env"] == {
        "VERCEL_QUEUE_BASE_URL": host.queue_url,
        "VERCEL_QUEUE_TOKEN": "vc-dev-token",
        "VERCEL_REGION": "dev1",
    }
    _wait_settled(host, "jobs", message_id)


def test_a_function_sends_with_an_idempotency_key_and_a_duplicate_is_not_delivered(
    host: RunningDevHost, log_path: Path
) -> None:
    tag = _tag()
    key = f"run-{tag}:geico"
    first = httpx.post(
        f"{host.url}/api/enqueue",
        json={"topic": "jobs", "payload": {"tag": tag, "script": ["ok"]}, "key": key},
    ).json()["messageId"]
    again = httpx.post(
        f"{host.url}/api/enqueue",
        json={"topic": "jobs", "payload": {"tag": tag, "script": ["ok"]}, "key": key},
    ).json()["messageId"]
    # The key alone decides, as in `vercel dev` (the SDK's embedded service also compares payloads).
    changed = httpx.post(
        f"{host.url}/api/enqueue",
        json={"topic": "jobs", "payload": {"tag": tag, "script": ["raise"]}, "key": key},
    ).json()["messageId"]

    _wait_for(log_path, host, "handled delivery", lambda r: bool(_runs(r, tag, "end")))
    _wait_settled(host, "jobs", first)
    # The queue holds the later sends as duplicates of the first, never to be delivered.
    for duplicate in (again, changed):
        response = httpx.post(
            f"{host.queue_url}/api/v3/topic/jobs/consumer/api_Sworker_Dpy/id/{duplicate}",
            headers={"Authorization": "Bearer vc-dev-token", "Accept": "multipart/mixed"},
        )
        assert response.status_code == 409
        assert response.json()["originalMessageId"] == first
    assert [r["id"] for r in _runs(_records(log_path), tag)] == [first]


async def test_a_delayed_message_is_not_delivered_before_its_delay(
    host: RunningDevHost, queue: QueueClient, log_path: Path
) -> None:
    tag = _tag()
    sent_at = time.time()
    await queue.send("jobs", {"tag": tag, "script": ["ok"]}, delay=3)
    records = _wait_for(log_path, host, "delayed delivery", lambda r: bool(_runs(r, tag, "end")))
    (start,) = _runs(records, tag)
    assert start["t"] - sent_at >= 2.9


async def test_a_failed_delivery_is_pushed_again_after_retry_after_seconds(
    host: RunningDevHost, queue: QueueClient, log_path: Path
) -> None:
    tag = _tag()
    message_id = await queue.send("jobs", {"tag": tag, "script": ["raise", "ok"]})
    records = _wait_for(log_path, host, "second delivery", lambda r: bool(_runs(r, tag, "end")))
    first, second = _runs(records, tag)
    assert (first["delivery"], second["delivery"]) == (1, 2)
    assert second["t"] - first["t"] >= 0.9  # retryAfterSeconds is 1
    _wait_settled(host, "jobs", message_id)


async def test_retry_after_is_honoured_and_the_delivery_count_rises(
    host: RunningDevHost, queue: QueueClient, log_path: Path
) -> None:
    tag = _tag()
    message_id = await queue.send(
        "later", {"tag": tag, "script": ["retry-after-1", "retry-after-1", "ok"]}
    )
    # retryAfterSeconds is 120 for this function: a redelivery within 30 s is RetryAfter(1)'s.
    records = _wait_for(log_path, host, "third delivery", lambda r: bool(_runs(r, tag, "end")))
    runs = _runs(records, tag)
    assert [r["delivery"] for r in runs] == [1, 2, 3]
    assert all(later["t"] - earlier["t"] >= 0.9 for earlier, later in itertools.pairwise(runs))
    _wait_settled(host, "later", message_id)


async def test_max_deliveries_stops_redelivery(
    host: RunningDevHost, queue: QueueClient, log_path: Path
) -> None:
    tag = _tag()
    message_id = await queue.send("jobs", {"tag": tag, "script": ["raise"]})
    _wait_for(log_path, host, "three deliveries", lambda r: len(_runs(r, tag)) >= 3)
    # Dropped after its third failure (maxDeliveries 3): settled, never pushed again.
    _wait_settled(host, "jobs", message_id)
    assert f"{message_id} delivery 3 to api/worker.py" in host.output()
    assert "maxDeliveries 3 reached" in host.output()
    assert [r["delivery"] for r in _runs(_records(log_path), tag)] == [1, 2, 3]


async def test_a_delivery_cut_at_max_duration_is_pushed_again(
    host: RunningDevHost, queue: QueueClient, log_path: Path
) -> None:
    tag = _tag()
    message_id = await queue.send("jobs", {"tag": tag, "script": ["hang", "ok"]})
    records = _wait_for(log_path, host, "second delivery", lambda r: bool(_runs(r, tag, "end")))
    first, second = _runs(records, tag)
    assert second["delivery"] == 2
    assert second["t"] - first["t"] >= WORKER_MAX_DURATION  # cut at maxDuration, then retried
    _wait_settled(host, "jobs", message_id)


async def test_a_delivery_to_a_killed_instance_is_pushed_again_to_another(
    host: RunningDevHost, queue: QueueClient, log_path: Path
) -> None:
    tag = _tag()
    message_id = await queue.send("jobs", {"tag": tag, "script": ["hang", "ok"]})
    records = _wait_for(log_path, host, "first delivery", lambda r: bool(_runs(r, tag)))
    (first,) = _runs(records, tag)
    assert first["pid"] in host.instance_pids("api/worker.py")
    os.kill(first["pid"], signal.SIGKILL)

    records = _wait_for(log_path, host, "redelivery", lambda r: bool(_runs(r, tag, "end")))
    first, second = _runs(records, tag)
    assert second["delivery"] == 2
    assert second["pid"] != first["pid"]
    _wait_settled(host, "jobs", message_id)


async def test_while_every_instance_is_being_replaced_messages_wait_for_one(
    host: RunningDevHost, queue: QueueClient, log_path: Path
) -> None:
    pids = host.instance_pids("api/worker.py")
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while not all(f"(pid {pid}) exited" in host.output() for pid in pids):
        assert time.monotonic() < deadline, host.output()
        await asyncio.sleep(0.02)

    tag = _tag()
    message_id = await queue.send("jobs", {"tag": tag, "script": ["ok"]})
    records = _wait_for(log_path, host, "delivery", lambda r: bool(_runs(r, tag, "end")))
    (start,) = _runs(records, tag)
    assert start["delivery"] == 1  # not spent on a "no instance" 503
    assert start["pid"] not in pids
    _wait_settled(host, "jobs", message_id)


async def test_messages_are_delivered_concurrently(
    host: RunningDevHost, queue: QueueClient, log_path: Path
) -> None:
    tag = _tag()
    ids = [await queue.send("jobs", {"tag": tag, "script": ["together:3"]}) for _ in range(3)]
    # Each handler returns only once all three are in flight: serialised pushes would fail.
    records = _wait_for(log_path, host, "three handled", lambda r: len(_runs(r, tag, "end")) >= 3)
    assert sorted(r["id"] for r in _runs(records, tag, "end")) == sorted(ids)
    assert all(r["delivery"] == 1 for r in _runs(records, tag))


def test_queue_triggers_are_read_from_vercel_json_as_vercels_build_compiles_them(
    tmp_path: Path,
) -> None:
    root = Path(__file__).resolve().parent.parent
    (trigger,) = discover_triggers(root, discover_functions(root))
    assert (trigger.spec.file, trigger.path, trigger.topic) == (
        "api/work.py",
        "/api/work",
        "quote-provider-work",
    )
    assert trigger.consumer == "api_Swork_Dpy"
    assert (trigger.retry_after_seconds, trigger.max_deliveries) == (10, 10)

    # A glob key: the consumer is named after the key, as @vercel/build-utils names it.
    (tmp_path / "api" / "jobs").mkdir(parents=True)
    (tmp_path / "api" / "jobs" / "mail.py").write_text("app = None\n")
    functions = {
        "api/jobs/*.py": {"experimentalTriggers": [{"type": "queue/v2beta", "topic": "m*"}]}
    }
    (tmp_path / "vercel.json").write_text(json.dumps({"functions": functions}))
    (trigger,) = discover_triggers(tmp_path, discover_functions(tmp_path))
    assert trigger.consumer == "api_Sjobs_S_2A_Dpy"
    assert (trigger.retry_after_seconds, trigger.max_deliveries) == (
        60,
        32,
    )  # vercel dev's defaults
    assert trigger.matches("mail") and not trigger.matches("other")

    functions["api/jobs/*.py"]["experimentalTriggers"][0]["retryAfterSeconds"] = 0
    (tmp_path / "vercel.json").write_text(json.dumps({"functions": functions}))
    with pytest.raises(QueueConfigError, match="retryAfterSeconds"):
        discover_triggers(tmp_path, discover_functions(tmp_path))
