"""Vercel Queues on the dev host: the SDK's embedded queue service, and push delivery to the
functions that vercel.json triggers from a topic, the way Vercel does it.

The `vercel-queue` SDK's embedded service (its Queue API: send, receive, lease, ack) is served in
the host's event loop on its own loopback port; every function gets what `vercel dev` gives it,
``VERCEL_QUEUE_BASE_URL``, ``VERCEL_QUEUE_TOKEN=vc-dev-token`` and ``VERCEL_REGION=dev1``, so the
SDK's ``send()`` and push acceptance talk to it unchanged.

A function whose ``functions`` entry in vercel.json has an ``experimentalTriggers`` item of type
``queue/v2beta`` is the consumer group Vercel's build names after that entry's key (sanitized:
``api/work.py`` -> ``api_Swork_Dpy``). Each visible message of its topic is leased and POSTed to
the function through the host's front door (so round-robin over instances, the
``x-vercel-internal-deadline`` header and the maxDuration cut apply) with the CloudEvent headers
a Vercel push carries. Then, as on Vercel:

- a 2xx answer settles nothing by itself: the SDK in the function has acknowledged the message,
  or (``RetryAfter(n)``) set its visibility so that it comes back after n seconds;
- any other answer, a connection lost (the instance died) or the maxDuration cut is a failed
  delivery: the lease is revoked and the message is pushed again after ``retryAfterSeconds``
  (with ``visibility_only``, a host that honours visibility alone: once its current visibility
  deadline passes, as the push's lease and the function's renewals last set it);
- a message that has had ``maxDeliveries`` deliveries is not pushed again (it is dropped);
- messages are pushed concurrently, each on its own request (``maxConcurrency`` caps them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from vercel.queue import sanitize_name
from vercel.queue._internal.embedded import (
    DEFAULT_DEPLOYMENT_PARTITION,
    EmbeddedQueueAsgiApp,
    EmbeddedQueueServer,
    StoredMessage,
)

from tools.devhost.proxy import INSTANCE_HEADER, rfc3339
from tools.devhost.routes import FunctionSpec, _glob_regex, _route_segments

# What `vercel dev` gives functions for its local queue broker (getDevQueueEnv, CLI 64).
DEV_TOKEN = "vc-dev-token"
DEV_REGION = "dev1"
CLOUD_EVENT_TYPE = "com.vercel.queue.v2beta"
# `vercel dev`'s defaults for a trigger that leaves these out.
DEFAULT_RETRY_AFTER_SECONDS = 60.0
DEFAULT_MAX_DELIVERIES = 32
_IDLE_POLL_SECONDS = 0.1  # how often visibility deadlines are checked when nothing wakes us
_KEEP_RECORDED_REQUESTS = 200  # the embedded service records every request; trim it

Log = Callable[[str], None]


@dataclass(frozen=True)
class QueueTrigger:
    """One function's ``queue/v2beta`` trigger, as Vercel's build compiles it."""

    spec: FunctionSpec
    pattern: str  # the vercel.json `functions` key that configured it
    topic: str  # a topic name, or a pattern with `*`
    consumer: str  # the consumer group: the sanitized pattern
    retry_after_seconds: float
    max_deliveries: int
    initial_delay_seconds: float
    max_concurrency: int | None

    @property
    def path(self) -> str:
        return "/" + "/".join(_route_segments(self.spec.file))

    def matches(self, topic: str) -> bool:
        if "*" not in self.topic:
            return topic == self.topic
        return re.fullmatch(".*".join(map(re.escape, self.topic.split("*"))), topic) is not None

    def describe(self) -> str:
        return (
            f"{self.spec.file} <- topic {self.topic} (consumer {self.consumer}, "
            f"retryAfterSeconds {self.retry_after_seconds:g}, "
            f"maxDeliveries {self.max_deliveries})"
        )


class QueueConfigError(ValueError):
    pass


def discover_triggers(root: Path, specs: list[FunctionSpec]) -> list[QueueTrigger]:
    """The functions vercel.json triggers from a queue topic (``queue/v2beta``)."""
    config_path = root / "vercel.json"
    if not config_path.is_file():
        return []
    config: Any = json.loads(config_path.read_text(encoding="utf-8"))
    functions = config.get("functions") if isinstance(config, Mapping) else None
    if not isinstance(functions, Mapping):
        return []
    triggers = []
    for spec in specs:
        pattern = _configuring_pattern(spec.file, functions)
        if pattern is None:
            continue
        for item in functions[pattern].get("experimentalTriggers") or []:
            if isinstance(item, Mapping) and item.get("type") == "queue/v2beta":
                triggers.append(_trigger(spec, pattern, item))
    return triggers


def _configuring_pattern(file: str, functions: Mapping[str, Any]) -> str | None:
    if isinstance(functions.get(file), Mapping):
        return file
    for pattern, options in functions.items():
        if isinstance(options, Mapping) and _glob_regex(str(pattern)).fullmatch(file):
            return str(pattern)
    return None


def _trigger(spec: FunctionSpec, pattern: str, item: Mapping[str, Any]) -> QueueTrigger:
    where = f'vercel.json functions["{pattern}"].experimentalTriggers'
    topic = item.get("topic")
    if not isinstance(topic, str) or not re.fullmatch(r"[A-Za-z0-9_*-]+", topic):
        raise QueueConfigError(f"{where}: topic must be a queue name, got {topic!r}")

    def number(name: str, default: float | None, *, integer: bool = False) -> float | None:
        value = item.get(name, default)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise QueueConfigError(f"{where}: {name} must be a non-negative number")
        if integer and value != int(value):
            raise QueueConfigError(f"{where}: {name} must be an integer")
        return float(value)

    retry_after = number("retryAfterSeconds", DEFAULT_RETRY_AFTER_SECONDS)
    max_deliveries = number("maxDeliveries", DEFAULT_MAX_DELIVERIES, integer=True)
    max_concurrency = number("maxConcurrency", None, integer=True)
    assert retry_after is not None and max_deliveries is not None
    if (
        retry_after <= 0
        or max_deliveries < 1
        or (max_concurrency is not None and max_concurrency < 1)
    ):
        raise QueueConfigError(
            f"{where}: retryAfterSeconds must be positive, "
            "maxDeliveries and maxConcurrency at least 1"
        )
    return QueueTrigger(
        spec=spec,
        pattern=pattern,
        topic=topic,
        consumer=str(sanitize_name(pattern)),
        retry_after_seconds=retry_after,
        max_deliveries=int(max_deliveries),
        initial_delay_seconds=number("initialDelaySeconds", 0) or 0.0,
        max_concurrency=int(max_concurrency) if max_concurrency is not None else None,
    )


class _QueueServer(EmbeddedQueueServer):
    """The SDK's embedded queue, deduplicating by idempotency key alone as `vercel dev` does.

    (The SDK's embedded service only treats a send as a duplicate when its payload is also the
    same; Vercel's own local broker matches on topic and key.)
    """

    def __init__(self) -> None:
        super().__init__()
        self._first_by_key: dict[tuple[str, str, str], str] = {}

    def put(self, topic: str, payload: bytes, headers: Mapping[str, str]) -> StoredMessage:
        key = headers.get("Vqs-Idempotency-Key")
        deployment = headers.get("Vqs-Deployment-Id", DEFAULT_DEPLOYMENT_PARTITION)
        if key and (first := self._first_by_key.get((topic, deployment, key))):
            self.state.idempotency.setdefault((topic, deployment, key, payload), first)
        message = super().put(topic, payload, headers)
        if key:
            self._first_by_key.setdefault((topic, deployment, key), message.message_id)
        return message


class QueueService:
    """The embedded queue service on a loopback port, and its push dispatcher."""

    def __init__(
        self, triggers: list[QueueTrigger], *, log: Log, visibility_only: bool = False
    ) -> None:
        self.triggers = triggers
        self.log = log
        self.visibility_only = visibility_only
        self.server = _QueueServer()
        self.app = EmbeddedQueueAsgiApp(self.server)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._http = _QuietServer(
            uvicorn.Config(
                self.app,
                lifespan="off",
                access_log=False,
                log_level="warning",
                server_header=False,
                date_header=False,
                timeout_graceful_shutdown=1,
            )
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._dispatcher: _Dispatcher | None = None

    def environment(self) -> dict[str, str]:
        """What every function needs to reach this queue with the SDK."""
        return {
            "VERCEL_QUEUE_BASE_URL": self.url,
            "VERCEL_QUEUE_TOKEN": DEV_TOKEN,
            "VERCEL_REGION": DEV_REGION,
        }

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._http.serve(sockets=[self._listener])))
        while not self._http.started:
            if self._tasks[0].done():
                self._tasks[0].result()
                raise RuntimeError("the embedded queue service stopped while starting")
            await asyncio.sleep(0.01)

    def start_delivery(self, front_door: str, ready: Callable[[str], bool]) -> None:
        """Push messages to the triggered functions through the host at `front_door`.

        `ready(file)` says whether the function has an instance up. While it has none (all are
        being replaced) its messages wait, as Vercel would start an instance for them, rather than
        spend a delivery on a 503.
        """
        if self.triggers:
            self._dispatcher = _Dispatcher(self, front_door, ready)
            task = asyncio.create_task(self._dispatcher.run())
            task.add_done_callback(self._report_stop)
            self._tasks.append(task)

    def _report_stop(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            self.log(f"queue: delivery stopped by an error in the host: {error!r}")

    async def stop(self) -> None:
        self._http.should_exit = True
        if self._dispatcher is not None:
            await self._dispatcher.stop()
        for task in self._tasks[1:]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._listener.close()
        self.server.state.close()


class _Dispatcher:
    def __init__(
        self, service: QueueService, front_door: str, ready: Callable[[str], bool]
    ) -> None:
        self.ready = ready
        self.server = service.server
        self.state = service.server.state
        self.triggers = service.triggers
        self.log = service.log
        self.visibility_only = service.visibility_only
        self.front_door = front_door.rstrip("/")
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None))
        self._wake = asyncio.Event()
        self.server.add_wake_callback(self._wake.set)  # held weakly: self keeps the event alive
        self._in_flight: dict[str, set[asyncio.Task[None]]] = {
            t.consumer: set() for t in self.triggers
        }

    async def run(self) -> None:
        while True:
            self._wake.clear()
            for trigger in self.triggers:
                self._push_visible(trigger)
            if len(self.state.requests) > 2 * _KEEP_RECORDED_REQUESTS:
                del self.state.requests[:-_KEEP_RECORDED_REQUESTS]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_IDLE_POLL_SECONDS):
                    await self._wake.wait()

    async def stop(self) -> None:
        tasks = [task for tasks in self._in_flight.values() for task in tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.aclose()

    def _push_visible(self, trigger: QueueTrigger) -> None:
        in_flight = self._in_flight[trigger.consumer]
        if not self.ready(trigger.spec.file):
            return
        for topic in [t for t in self.state.by_topic if trigger.matches(t)]:
            while trigger.max_concurrency is None or len(in_flight) < trigger.max_concurrency:
                message = self.server.next_push_message(topic, trigger.consumer, None)
                if message is None:
                    break
                if self._held_back(trigger, message):
                    continue
                # The lease lasts as long as the invocation may; the SDK in the function renews it.
                lease_seconds = max(1, math.ceil(trigger.spec.max_duration))
                receipt = self.server.lease(message, trigger.consumer, lease_seconds)
                visible_at = message.lease_deadline_by_consumer[trigger.consumer]
                self.server.requeue_push_message(message, trigger.consumer, visible_at)
                task = asyncio.create_task(self._deliver(trigger, message, receipt, visible_at))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                task.add_done_callback(lambda _: self._wake.set())

    def _held_back(self, trigger: QueueTrigger, message: StoredMessage) -> bool:
        """Drops a message whose deliveries are spent; delays one within initialDelaySeconds."""
        consumer = trigger.consumer
        deliveries = message.delivery_count_by_consumer.get(consumer, 0)
        if deliveries >= trigger.max_deliveries:
            message.acknowledge_for(consumer)
            self.log(
                f"queue: {message.message_id} on {message.topic} dropped for {trigger.spec.file}: "
                f"maxDeliveries {trigger.max_deliveries} reached"
            )
            return True
        ready_at = message.created_at + timedelta(seconds=trigger.initial_delay_seconds)
        if ready_at > self.server.now:
            message.lease_deadline_by_consumer[consumer] = ready_at
            self.server.requeue_push_message(message, consumer, ready_at)
            return True
        return False

    async def _deliver(
        self,
        trigger: QueueTrigger,
        message: StoredMessage,
        receipt: str,
        visibility_deadline: datetime,
    ) -> None:
        consumer = trigger.consumer
        delivery = message.delivery_count_by_consumer[consumer]
        headers = push_headers(message, consumer, receipt, delivery, visibility_deadline)
        began = time.monotonic()
        where = f"{message.message_id} delivery {delivery} to {trigger.spec.file}"
        try:
            response = await self.client.post(
                self.front_door + trigger.path,
                content=message.payload.read(),
                headers=headers,
                timeout=httpx.Timeout(trigger.spec.max_duration + 15, connect=5.0),
            )
        except httpx.HTTPError as error:
            self._failed(trigger, message, receipt, f"{where}: {error!r}")
            return
        instance = response.headers.get(INSTANCE_HEADER.decode(), "no instance")
        outcome = (
            f"{where} ({instance}) -> {response.status_code} in {time.monotonic() - began:.1f} s"
        )
        if not response.is_success:
            self._failed(trigger, message, receipt, outcome)
        elif message.acknowledged_for(consumer):
            self.log(f"queue: {outcome}; acknowledged")
        else:
            seconds = (
                message.lease_deadline_by_consumer[consumer] - self.server.now
            ).total_seconds()
            self.log(
                f"queue: {outcome}; not acknowledged, visible again in {max(seconds, 0):.0f} s"
            )

    def _failed(
        self, trigger: QueueTrigger, message: StoredMessage, receipt: str, what: str
    ) -> None:
        consumer = trigger.consumer
        if message.leases_by_consumer.get(consumer) != receipt or message.acknowledged_for(
            consumer
        ):
            self.log(f"queue: {what}; already settled")
            return
        # The failed invocation's lease is revoked: a late ack or renewal from it is refused.
        del message.leases_by_consumer[consumer]
        self.state.by_receipt.pop(receipt, None)
        if message.delivery_count_by_consumer.get(consumer, 0) >= trigger.max_deliveries:
            message.acknowledge_for(consumer)
            self.log(f"queue: {what}; maxDeliveries {trigger.max_deliveries} reached, dropped")
            return
        if self.visibility_only:
            visible_at = max(message.lease_deadline_by_consumer[consumer], self.server.now)
        else:
            visible_at = self.server.now + timedelta(seconds=trigger.retry_after_seconds)
        message.lease_deadline_by_consumer[consumer] = visible_at
        self.server.requeue_push_message(message, consumer, visible_at)
        seconds = (visible_at - self.server.now).total_seconds()
        self.log(f"queue: {what}; redelivery in {seconds:.0f} s")


def push_headers(
    message: StoredMessage,
    consumer: str,
    receipt: str,
    delivery: int,
    visibility_deadline: datetime,
) -> dict[str, str]:
    """The headers of a Vercel Queues v2beta push (those `vercel dev` sends, and the SDK reads)."""
    return {
        "content-type": message.content_type,
        "ce-type": CLOUD_EVENT_TYPE,
        "ce-specversion": "1.0",
        "ce-source": f"/topic/{message.topic}/consumer/{consumer}",
        "ce-id": message.message_id,
        "ce-time": rfc3339(datetime.now(UTC)),
        "ce-vqsmessageid": message.message_id,
        "ce-vqsqueuename": message.topic,
        "ce-vqsconsumergroup": consumer,
        "ce-vqsreceipthandle": receipt,
        "ce-vqsdeliverycount": str(delivery),
        "ce-vqscreatedat": rfc3339(message.created_at),
        "ce-vqsexpiresat": rfc3339(message.expires_at),
        "ce-vqsvisibilitydeadline": rfc3339(visibility_deadline),
        "ce-vqsregion": DEV_REGION,
    }


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling (the host handles SIGINT/SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield
