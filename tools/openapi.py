"""`python -m tools.openapi` (`make openapi`): the OpenAPI 3.1 description of the HTTP API.

The schemas come from the pydantic models in lib/models.py (what the handlers validate and
serialise with); the routes, parameters, headers and responses are declared below, after
../shared/design/API.md. The output is committed as openapi.json and served by
api/openapi.py at /api/openapi.json; `--check` exits 1 when the committed file is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Union, get_args

from pydantic import BaseModel, Field, TypeAdapter, create_model
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import core_schema

from lib import models

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT_PATH = ROOT / "openapi.json"
SCHEMAS = "#/components/schemas/"
PROBLEM_JSON = "application/problem+json"


class _ContractSchema(GenerateJsonSchema):
    """Pydantic's JSON Schema, told what the handlers send: a response field with a default is
    always present, except a None default, which `exclude_none` leaves out (so never null)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False  # "Firstname" beside firstName says nothing

    def field_is_required(self, field: Any, total: bool) -> bool:
        if self.mode == "serialization" and field["schema"]["type"] == "default":
            return field["schema"].get("default", ...) is not None
        return super().field_is_required(field, total)

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        inner = schema["schema"]
        omitted_when_none = self.mode == "serialization" and schema.get("default", ...) is None
        if omitted_when_none and inner["type"] == "nullable":
            return self.generate_inner(inner["schema"])
        return super().default_schema(schema)


def _on_the_wire(event: type[BaseModel]) -> type[BaseModel]:
    """An event as sent (SSE `data:` and GET ?since=): its fields and its id."""
    wire: type[BaseModel] = create_model(
        event.__name__,
        __base__=event,
        __doc__=event.__doc__,
        id=(
            int,
            Field(
                ge=0,
                description=(
                    "The event's position in the run: 0, 1, 2, …, increasing by one except where "
                    "a retried write landed twice (its later copy is never sent; its id is skipped)"
                ),
            ),
        ),
    )
    return wire


def _event_types() -> list[type[BaseModel]]:
    union, _discriminator = get_args(models.RunEvent)
    return list(get_args(union))


WIRE_EVENTS = [_on_the_wire(event) for event in _event_types()]

# (component name, mode, type): every schema the document names.
COMPONENT_TYPES: list[tuple[str, JsonSchemaMode, Any]] = [
    ("QuoteRequest", "validation", models.QuoteRequest),
    ("RunAccepted", "serialization", models.RunAccepted),
    ("RunSnapshot", "serialization", models.RunSnapshot),
    ("ProblemDetail", "serialization", models.ProblemDetail),
    ("HealthReport", "serialization", models.HealthReport),
]


def component_schemas() -> dict[str, Any]:
    inputs: list[tuple[str, JsonSchemaMode, TypeAdapter[Any]]] = [
        (name, mode, TypeAdapter(kind)) for name, mode, kind in COMPONENT_TYPES
    ]
    inputs.append(("RunEvent", "serialization", TypeAdapter(_discriminated(WIRE_EVENTS))))
    top, definitions = TypeAdapter.json_schemas(
        inputs, by_alias=True, ref_template=SCHEMAS + "{model}", schema_generator=_ContractSchema
    )
    schemas: dict[str, Any] = dict(definitions.get("$defs", {}))
    schemas["RunEvent"] = {
        "description": "One event of a run, as each SSE `data:` line and GET's `events` carry it.",
        **top[("RunEvent", "serialization")],
    }
    # GET passes stored events through as JSON; they are the stream's events.
    schemas["RunSnapshot"]["properties"]["events"] = {
        "type": "array",
        "items": {"$ref": SCHEMAS + "RunEvent"},
        "description": "With ?since=N: the events with id > N, in order (at most ?limit=).",
    }
    return dict(sorted(schemas.items()))


def _discriminated(events: list[type[BaseModel]]) -> Any:
    return Annotated[Union[tuple(events)], Field(discriminator="type")]  # noqa: UP007


# --- responses, headers and parameters ---------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": SCHEMAS + name}


def _header(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


def _json(schema: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
    }
    if headers:
        response["headers"] = headers
    return response


def _problem(description: str, *headers: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": _ref("ProblemDetail")}},
    }
    if headers:
        response["headers"] = {name: _header(name) for name in headers}
    return response


HEADERS: dict[str, Any] = {
    "Location": {
        "description": "The run's status URL, /api/quotes/{runId}.",
        "schema": {"type": "string"},
    },
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "WWW-Authenticate": {
        "description": "The scheme to authenticate with: Bearer.",
        "schema": {"type": "string"},
    },
    "Allow": {"description": "The methods this path allows.", "schema": {"type": "string"}},
    "ETag": {
        "description": "A finished run's snapshot only: a strong validator of this response.",
        "schema": {"type": "string"},
    },
    "Cache-Control": {
        "description": (
            "no-store while the run is processing; once it has finished, public, max-age=0, "
            "s-maxage=<seconds until the run expires> (shared caches keep it until then)."
        ),
        "schema": {"type": "string"},
    },
}

PARAMETERS: dict[str, Any] = {
    "runId": {
        "name": "runId",
        "in": "path",
        "required": True,
        "description": "The run id POST returned. Anything else is 404 (storage is not asked).",
        "schema": {"type": "string", "pattern": f"^{models.RUN_ID_PATTERN.pattern}$"},
    },
}

UNAVAILABLE = "Storage (or, for POST, the queue) is not configured or cannot be reached."
NOT_FOUND = "No such run: never started, expired, or not a well-formed run id."

RUN_LINKS: dict[str, Any] = {
    name: {"operationId": operation, "parameters": {"runId": "$response.body#/runId"}}
    for name, operation in (("GetRun", "getQuoteRun"), ("StreamRun", "streamQuoteRun"))
}

START_RUN: dict[str, Any] = {
    "operationId": "startQuoteRun",
    "summary": "Start a quote run",
    "description": (
        "Validates the request, stores a new run and queues its providers; answers at once. "
        "Follow the run with its streamUrl (SSE) or poll its statusUrl. Checks run in this "
        "order: 405, 401, 415, 413, 400, 422, 429, then storage and queue (503)."
    ),
    "tags": ["quote runs"],
    "security": [{"bearer": []}, {}],
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": (
                "The same key with the same body within the run's TTL returns the same run "
                "(200); with a different body it is 422 idempotency-key-reused. Scoped to the "
                "caller."
            ),
            "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
        }
    ],
    "requestBody": {
        "required": True,
        "description": "At most 16 KiB of JSON (application/json or any +json type).",
        "content": {"application/json": {"schema": _ref("QuoteRequest")}},
    },
    "responses": {
        "202": {
            **_json("RunAccepted", "The run was started.", {"Location": _header("Location")}),
            "links": RUN_LINKS,
        },
        "200": {
            **_json(
                "RunAccepted",
                "An Idempotency-Key replay: the run this key already started.",
                {"Location": _header("Location")},
            ),
            "links": RUN_LINKS,
        },
        "400": _problem("The body is not valid JSON, or Idempotency-Key is malformed."),
        "401": _problem(
            "Credentials missing or refused (when the deployment requires them).",
            "WWW-Authenticate",
        ),
        "405": _problem("A method other than POST (or OPTIONS) on this path.", "Allow"),
        "413": _problem("The body is larger than 16 KiB."),
        "415": _problem("The body is not sent as JSON."),
        "422": _problem(
            "The request is invalid (each field named in `errors`), or its Idempotency-Key "
            "was used with another body."
        ),
        "429": _problem("Rate limited, or the day's runs are spent.", "Retry-After"),
        "503": _problem(UNAVAILABLE + " Also a paid deployment left open.", "Retry-After"),
    },
}

GET_RUN: dict[str, Any] = {
    "operationId": "getQuoteRun",
    "summary": "A run's current state",
    "description": (
        "The run's status, progress, providers and quotes so far (cheapest first). With "
        "?since=N also its events after N, for clients that poll instead of streaming. "
        "A processing run's answer is Cache-Control: no-store. A finished run never changes "
        "until it expires: its answer (and each ?since= page of it) carries a strong ETag and "
        "Cache-Control: public, max-age=0, s-maxage=<seconds until it expires>, and a request "
        "whose If-None-Match names that ETag is answered 304."
    ),
    "tags": ["quote runs"],
    "parameters": [
        {"$ref": "#/components/parameters/runId"},
        {
            "name": "since",
            "in": "query",
            "required": False,
            "description": "Also return the events with id > since (-1: from the first).",
            "schema": {"type": "integer", "minimum": -1, "maximum": 2**53},
        },
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "description": "At most this many events with ?since=.",
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
        },
        {
            "name": "If-None-Match",
            "in": "header",
            "required": False,
            "description": "The ETag of a finished run's snapshot already held: 304 if unchanged.",
            "schema": {"type": "string"},
        },
    ],
    "responses": {
        "200": _json(
            "RunSnapshot",
            "The run's state.",
            {"Cache-Control": _header("Cache-Control"), "ETag": _header("ETag")},
        ),
        "304": {
            "description": "A finished run whose snapshot is the one If-None-Match names.",
            "headers": {"Cache-Control": _header("Cache-Control"), "ETag": _header("ETag")},
        },
        "400": _problem("since or limit is not an integer in range."),
        "404": _problem(NOT_FOUND),
        "503": _problem(UNAVAILABLE, "Retry-After"),
    },
}

STREAM_RUN: dict[str, Any] = {
    "operationId": "streamQuoteRun",
    "summary": "A run's events, live (Server-Sent Events)",
    "description": (
        "Opens with `retry: 2000`, then sends each event as `id: N` and one `data:` line "
        "holding a RunEvent (no `event:` field), and `: keep-alive` comments after 15 s of "
        "silence. Ends after the terminal event (complete, error or cancelled), or on its own "
        "before "
        "the function's deadline: reconnect with Last-Event-ID, to any instance, without "
        "losing or repeating an event."
    ),
    "tags": ["quote runs"],
    "parameters": [
        {"$ref": "#/components/parameters/runId"},
        {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "description": (
                "Resume after this event id (browsers send it on reconnect); wins over "
                "?lastEventId. Empty means no cursor."
            ),
            "schema": {"type": "string", "pattern": "^[0-9]{0,16}$"},
        },
        {
            "name": "lastEventId",
            "in": "query",
            "required": False,
            "description": "Resume after this event id, for a first connection.",
            "schema": {"type": "integer", "minimum": 0, "maximum": 10**16 - 1},
        },
    ],
    "responses": {
        "200": {
            "description": (
                "The event stream. Every `data:` line is one RunEvent; its `id:` line is the "
                "event's id."
            ),
            "content": {
                "text/event-stream": {
                    # Before OpenAPI 3.2's itemSchema, an event stream's schema is one event's.
                    "schema": {
                        "description": (
                            "One event as the stream frames it: `id:` is the event's id and "
                            "its one `data:` line a RunEvent as JSON; no `event:` field, so "
                            "EventSource delivers each as a `message`."
                        ),
                        "type": "object",
                        "required": ["id", "data"],
                        "properties": {
                            "id": {"type": "string", "pattern": "^[0-9]+$"},
                            "event": {"const": "message"},
                            "data": {
                                "type": "string",
                                "contentMediaType": "application/json",
                                "contentSchema": _ref("RunEvent"),
                            },
                            "retry": {"type": "integer", "minimum": 0},
                        },
                    }
                }
            },
        },
        "204": {
            "description": (
                "The run is over and nothing follows the cursor: stops EventSource reconnects."
            )
        },
        "400": _problem("Last-Event-ID (or lastEventId) is not a non-negative integer."),
        "404": _problem(NOT_FOUND),
        "503": _problem(UNAVAILABLE, "Retry-After"),
    },
}

CANCEL_RUN: dict[str, Any] = {
    "operationId": "cancelQuoteRun",
    "summary": "Cancel a run",
    "description": (
        "Ends the run at once, in one fenced write: its terminal event is `cancelled` (the "
        "quotes received so far, cheapest first, `best`, `failed`, and `stopped`: the providers "
        "that had not finished), its status `cancelled`. Every agent run still going is "
        "cancelled with the agent API; no new one starts; its queued work and deadline do "
        "nothing. A repeated cancel answers the same. A disconnect is never a cancel. Checks "
        "run in this order: 405, 404 for a malformed id, 401 (before storage: without the "
        "token nobody learns whether a run exists), then 404, 409 or 200. Cache-Control: "
        "no-store."
    ),
    "tags": ["quote runs"],
    "security": [{"cancelToken": []}],
    "parameters": [{"$ref": "#/components/parameters/runId"}],
    "responses": {
        "200": _json("RunSnapshot", "The cancelled run's state (also for a repeated cancel)."),
        "401": _problem(
            "The cancel token is missing or is not this run's (checked in constant time).",
            "WWW-Authenticate",
        ),
        "404": _problem(NOT_FOUND),
        "405": _problem("A method other than GET, DELETE (or OPTIONS) on this path.", "Allow"),
        "409": _problem("`run-already-ended`: the run had already completed or failed."),
        "503": _problem(UNAVAILABLE, "Retry-After"),
    },
}

HEALTH: dict[str, Any] = {
    "operationId": "getHealth",
    "summary": "Whether this deployment can run quotes",
    "description": (
        "One cheap storage command; whether a queue is configured; which quote source is "
        "active. No secrets. Cache-Control: no-store."
    ),
    "tags": ["operations"],
    "responses": {
        "200": _json("HealthReport", "Storage answers and a queue is configured."),
        "503": _problem(
            "Storage is not configured or unreachable, or no queue is configured: the detail "
            "names what is missing.",
            "Retry-After",
        ),
    },
}

DESCRIBE: dict[str, Any] = {
    "operationId": "getOpenApiDocument",
    "summary": "This document",
    "tags": ["operations"],
    "responses": {
        "200": {
            "description": "The API's OpenAPI 3.1 description.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "503": _problem(
            "`openapi-unavailable`: this deployment was built without its openapi.json."
        ),
    },
}

PATHS: dict[str, Any] = {
    "/api/quotes": {"post": START_RUN},
    "/api/quotes/{runId}": {"get": GET_RUN, "delete": CANCEL_RUN},
    "/api/quotes/{runId}/stream": {"get": STREAM_RUN},
    "/api/health": {"get": HEALTH},
    "/api/openapi.json": {"get": DESCRIBE},
}


def _version() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return str(project["version"])


def build_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Quote runs API",
            "version": _version(),
            "description": (
                "Start a quote run (several auto-insurance providers quoted at once), then "
                "follow it over Server-Sent Events or by polling. JSON bodies are camelCase; "
                "times are RFC 3339 UTC; errors are RFC 9457 problem details "
                "(application/problem+json). Generated from the pydantic models by "
                "`make openapi`; the contract in prose is the README's API section."
            ),
        },
        "tags": [
            {"name": "quote runs", "description": "Start a run and follow it."},
            {"name": "operations", "description": "For operators and client generators."},
        ],
        "paths": PATHS,
        "components": {
            "schemas": component_schemas(),
            "parameters": PARAMETERS,
            "headers": HEADERS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "Required when the deployment sets QUOTES_API_KEYS: an API key, or a "
                        "start token (a JWT, HS256, audience `quotes`, expiring within 10 "
                        "minutes) that starts one run. Missing or refused: 401 with "
                        "WWW-Authenticate: Bearer."
                    ),
                },
                "cancelToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "The `cancelToken` of the POST that started the run (an HMAC of the run "
                        "id keyed by the deployment's secret): the one credential that cancels "
                        "it."
                    ),
                },
            },
        },
    }


def render() -> str:
    return json.dumps(build_document(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.openapi", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if openapi.json is not up to date"
    )
    args = parser.parse_args(argv)
    text = render()
    current = DOCUMENT_PATH.read_text(encoding="utf-8") if DOCUMENT_PATH.exists() else ""
    if args.check:
        if current != text:
            print(f"{DOCUMENT_PATH.name} is stale: run `make openapi`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        DOCUMENT_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {DOCUMENT_PATH.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
