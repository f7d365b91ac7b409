"""The API contract in code: the quote request, quotes, events, the stored run record and the
snapshot GET returns. Handlers validate and serialise with these; nothing builds bodies by hand."""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

# The plain terms live in lib.terms (no pydantic); lib.models re-exports every one of them.
from lib.terms import PROVIDER_IDS as PROVIDER_IDS
from lib.terms import PROVIDER_NAMES as PROVIDER_NAMES
from lib.terms import RUN_ID_PATTERN as RUN_ID_PATTERN
from lib.terms import TERMINAL_EVENT_TYPES as TERMINAL_EVENT_TYPES
from lib.terms import Coverage as Coverage
from lib.terms import ProviderErrorCode as ProviderErrorCode
from lib.terms import ProviderId as ProviderId
from lib.terms import ProviderStatus as ProviderStatus
from lib.terms import QuoteSourceName as QuoteSourceName
from lib.terms import RunErrorCode as RunErrorCode
from lib.terms import RunStatus as RunStatus
from lib.terms import format_time as format_time
from lib.terms import is_run_id as is_run_id
from lib.terms import new_run_id as new_run_id
from lib.terms import percent as percent
from lib.terms import utc_now as utc_now


def _as_utc(value: datetime) -> datetime:
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


UtcTime = Annotated[
    datetime,
    AfterValidator(_as_utc),
    PlainSerializer(format_time, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class CamelModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        serialize_by_alias=True,
        # A validation error's text (it may be logged) never quotes the input: it may be personal.
        hide_input_in_errors=True,
        # Each model's validator is built when first used: a function builds only its own.
        defer_build=True,
    )


# --- the request -------------------------------------------------------------------------------

_VIN_VALUES = {
    **{str(d): d for d in range(10)},
    **dict(zip("ABCDEFGH", range(1, 9), strict=True)),
    **dict(zip("JKLMN", range(1, 6), strict=True)),
    "P": 7,
    "R": 9,
    **dict(zip("STUVWXYZ", range(2, 10), strict=True)),
}
_VIN_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)


def vin_check_digit(vin: str) -> str:
    """The check digit a 17-character VIN must carry at position 9 (49 CFR 565.15)."""
    total = sum(_VIN_VALUES[c] * w for c, w in zip(vin, _VIN_WEIGHTS, strict=True))
    remainder = total % 11
    return "X" if remainder == 10 else str(remainder)


def _check_vin(value: str) -> str:
    vin = value.strip().upper()
    if len(vin) != 17:
        raise ValueError(f"must be 17 characters, got {len(vin)}")
    forbidden = sorted({c for c in vin if c in "IOQ"})
    if forbidden:
        raise ValueError(f"must not contain the letters I, O or Q (found {', '.join(forbidden)})")
    invalid = sorted({c for c in vin if c not in _VIN_VALUES})
    if invalid:
        raise ValueError(f"may contain only letters and digits (found {''.join(invalid)!r})")
    expected = vin_check_digit(vin)
    if vin[8] != expected:
        raise ValueError(f"check digit is {vin[8]}, expected {expected}")
    return vin


_ZIP = re.compile(r"[0-9]{5}(-[0-9]{4})?")  # ASCII digits only: \d takes any script's


def _check_zip(value: str) -> str:
    if not _ZIP.fullmatch(value):
        raise ValueError("must be a US ZIP code: 12345 or 12345-6789")
    return value


# Names reach a web agent's instructions: letters of any script (with their combining marks),
# spaces, apostrophes, hyphens and periods, nothing else — no quotes, brackets, newlines or
# invisible format characters (U+202E and friends) to break out of the goal's quoting with.
_NAME_PUNCTUATION = frozenset(" '’-.")
_NAME_CATEGORIES = ("L", "Mn", "Mc")


def _name_character(c: str) -> bool:
    return c in _NAME_PUNCTUATION or unicodedata.category(c).startswith(_NAME_CATEGORIES)


def _describe_characters(chars: list[str]) -> str:
    return ", ".join(
        repr(c) if c.isprintable() and c.isascii() else f"U+{ord(c):04X}" for c in chars
    )


def _check_name(value: str) -> str:
    name = unicodedata.normalize("NFC", value).strip()
    if not 1 <= len(name) <= 64:
        raise ValueError("must be 1 to 64 characters")
    refused = sorted({c for c in name if not _name_character(c)})
    if refused:
        raise ValueError(
            "may contain only letters, spaces, apostrophes, hyphens and periods"
            f" (found {_describe_characters(refused)})"
        )
    if not any(c.isalpha() for c in name):
        raise ValueError("must contain a letter")
    return name


def age_on(birth: date, today: date) -> int:
    return today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))


def _configured_provider(value: str, info: ValidationInfo) -> str:
    context = info.context or {}
    configured: tuple[str, ...] = context.get("providers", PROVIDER_IDS)
    if value not in configured:
        raise ValueError(f"unknown provider {value!r}; one of {', '.join(configured)}")
    allowed: tuple[str, ...] | None = context.get("allowed")
    if allowed is not None and value not in allowed:
        raise ValueError(
            f"{value!r} is not allowed by this start token; it allows {', '.join(allowed)}"
        )
    return value


ConfiguredProvider = Annotated[
    str,
    AfterValidator(_configured_provider),
    WithJsonSchema({"type": "string", "enum": list(PROVIDER_IDS)}),
]


class Driver(CamelModel):
    # Personal data: left out of repr(), so no log line or exception message can show it.
    first_name: Annotated[str, AfterValidator(_check_name), Field(repr=False)]
    last_name: Annotated[str, AfterValidator(_check_name), Field(repr=False)]
    date_of_birth: Annotated[date, Field(repr=False)]

    @field_validator("date_of_birth", mode="before")
    @classmethod
    def _iso_date_only(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("must be an ISO date string such as 1990-04-12")
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise ValueError("must be an ISO date such as 1990-04-12") from None

    @field_validator("date_of_birth")
    @classmethod
    def _driving_age(cls, value: date) -> date:
        age = age_on(value, utc_now().date())
        if not 16 <= age <= 100:
            raise ValueError(f"the driver must be 16 to 100 years old today (age {age})")
        return value


EXAMPLE_QUOTE_REQUEST: dict[str, Any] = {
    "vin": "2C3CDZAG2GH967639",
    "zip": "94107",
    "driver": {"firstName": "Ana", "lastName": "Lee", "dateOfBirth": "1990-04-12"},
    "vehicle": {"annualMileage": 12000, "use": "commute", "ownership": "owned"},
    "coverage": "standard",
    "providers": ["geico", "progressive"],
}


def _optional_fields_take_null(schema: dict[str, Any]) -> None:
    """The JSON Schema side of QuoteRequest._null_means_absent: an optional field may be null."""
    required = set(schema.get("required", ()))
    for name, field_schema in schema.get("properties", {}).items():
        if name in required or {"type": "null"} in field_schema.get("anyOf", ()):
            continue
        default = field_schema.pop("default", None)
        description = field_schema.pop("description", None)
        nullable: dict[str, Any] = {"anyOf": [field_schema, {"type": "null"}]}
        if description is not None:
            nullable["description"] = description
        if default is not None:
            nullable["default"] = default
        schema["properties"][name] = nullable


class Vehicle(CamelModel):
    model_config = ConfigDict(json_schema_extra=_optional_fields_take_null)

    annual_mileage: Annotated[int, Field(ge=0, le=150_000, strict=True)] = 12_000
    use: Literal["commute", "pleasure", "business"] = "commute"
    ownership: Literal["owned", "financed", "leased"] = "owned"


def _quote_request_schema(schema: dict[str, Any]) -> None:
    _optional_fields_take_null(schema)
    schema["examples"] = [EXAMPLE_QUOTE_REQUEST]


class QuoteRequest(CamelModel):
    """POST /api/quotes. Validated with context {"providers": the configured provider ids} and,
    for a start token limited to some providers, {"allowed": those of them}."""

    model_config = ConfigDict(json_schema_extra=_quote_request_schema)

    vin: Annotated[
        str,
        Field(strict=True, json_schema_extra={"pattern": "^[A-HJ-NPR-Za-hj-npr-z0-9]{17}$"}),
        AfterValidator(_check_vin),
    ] = Field(description="With a valid check digit (position 9, 49 CFR 565); upper-cased.")
    zip: Annotated[
        str,
        Field(strict=True, json_schema_extra={"pattern": "^[0-9]{5}(-[0-9]{4})?$"}),
        AfterValidator(_check_zip),
    ]
    driver: Driver
    vehicle: Vehicle = Field(default_factory=Vehicle)
    coverage: Coverage = "standard"
    providers: list[ConfiguredProvider] | None = Field(
        default=None, description="Distinct ids of configured providers; default all."
    )

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            optional = ("vehicle", "coverage", "providers")
            data = {k: v for k, v in data.items() if not (k in optional and v is None)}
            if isinstance(data.get("vehicle"), dict):
                data["vehicle"] = {k: v for k, v in data["vehicle"].items() if v is not None}
        return data

    @field_validator("providers")
    @classmethod
    def _distinct_providers(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must name at least one provider")
        for index, name in enumerate(value):
            if name in value[:index]:
                raise ValueError(
                    f"{name!r} is listed twice (items {value.index(name)} and {index})"
                )
        return value

    def selected_providers(self, configured: tuple[ProviderId, ...]) -> list[ProviderId]:
        if self.providers is None:
            return list(configured)
        return [p for p in configured if p in self.providers]


class PricedRequest(CamelModel):
    """What a run priced, without the driver: shown beside the run so a shared or reloaded run
    says what it is for. Never the full VIN, the driver's name or birth date."""

    vin_ending: str = Field(description="The VIN's last six characters (its serial number).")
    zip: str
    vehicle: Vehicle
    coverage: Coverage
    providers: list[ProviderId] = Field(description="The insurers asked, in the run's order.")

    @classmethod
    def of(cls, request: QuoteRequest, providers: list[ProviderId]) -> PricedRequest:
        return cls(
            vin_ending=request.vin[-6:],
            zip=request.zip,
            vehicle=request.vehicle,
            coverage=request.coverage,
            providers=providers,
        )


# --- quotes and provider state -----------------------------------------------------------------


class Quote(CamelModel):
    provider: ProviderId
    monthly_premium: float
    annual_premium: float
    currency: str = "USD"
    coverage: Coverage
    deductible: int
    source: QuoteSourceName
    quoted_at: UtcTime


class ErrorInfo(CamelModel):
    code: str
    message: str


class ProviderState(CamelModel):
    provider: ProviderId
    status: ProviderStatus = "pending"
    quote: Quote | None = None
    error: ErrorInfo | None = None
    last_activity: str | None = None


def cheapest_first(quotes: list[Quote]) -> list[Quote]:
    return sorted(quotes, key=lambda q: (q.monthly_premium, q.provider))


# --- events ------------------------------------------------------------------------------------


class StartedEvent(CamelModel):
    type: Literal["started"] = "started"
    providers: list[ProviderId]
    total: int
    ts: UtcTime = Field(default_factory=utc_now)


class ActivityEvent(CamelModel):
    type: Literal["activity"] = "activity"
    provider: ProviderId
    message: str
    ts: UtcTime = Field(default_factory=utc_now)


class ProgressEvent(CamelModel):
    type: Literal["progress"] = "progress"
    completed: int
    total: int
    percent: int
    ts: UtcTime = Field(default_factory=utc_now)


class QuoteEvent(CamelModel):
    type: Literal["quote"] = "quote"
    provider: ProviderId
    quote: Quote
    ts: UtcTime = Field(default_factory=utc_now)


class ProviderErrorEvent(CamelModel):
    type: Literal["provider_error"] = "provider_error"
    provider: ProviderId
    code: ProviderErrorCode
    message: str
    retryable: bool
    ts: UtcTime = Field(default_factory=utc_now)


class CompleteEvent(CamelModel):
    type: Literal["complete"] = "complete"
    quotes: list[Quote]
    best: ProviderId | None
    failed: list[ProviderId]
    ts: UtcTime = Field(default_factory=utc_now)


class ErrorEvent(CamelModel):
    type: Literal["error"] = "error"
    code: RunErrorCode
    message: str
    ts: UtcTime = Field(default_factory=utc_now)


class CancelledEvent(CamelModel):
    type: Literal["cancelled"] = "cancelled"
    quotes: list[Quote] = Field(
        description="The quotes received before the cancel, cheapest first."
    )
    best: ProviderId | None
    failed: list[ProviderId]
    stopped: list[ProviderId] = Field(description="The providers that had not finished.")
    ts: UtcTime = Field(default_factory=utc_now)


RunEvent = Annotated[
    StartedEvent
    | ActivityEvent
    | ProgressEvent
    | QuoteEvent
    | ProviderErrorEvent
    | CompleteEvent
    | ErrorEvent
    | CancelledEvent,
    Field(discriminator="type"),
]


# --- the stored run record and the snapshot GET returns -----------------------------------------


class RunMeta(CamelModel):
    """What is stored about a run when it is created, and never changed."""

    run_id: str
    created_at: UtcTime
    deadline: UtcTime
    coverage: Coverage
    providers: list[ProviderId]
    priced: PricedRequest | None = None  # None for runs stored before it was recorded


class RunEnd(CamelModel):
    """Stored once, atomically with the run's terminal event."""

    status: Literal["completed", "failed", "cancelled"]
    ended_at: UtcTime
    error: ErrorInfo | None = None


class ProviderOutcome(CamelModel):
    """Stored once per provider, atomically with its quote or provider_error event."""

    status: Literal["quoted", "failed"]
    quote: Quote | None = None
    error: ErrorInfo | None = None
    finished_at: UtcTime
    agent_steps: int | None = None  # every agent run's steps for this provider (None: unknown)


class ProviderWork(CamelModel):
    """One provider's progress through its paid attempts, written by whichever worker holds its
    lease, so the next delivery resumes it. Never returned by the API."""

    attempt: int = 0
    attempt_started_at: UtcTime | None = None
    first_started_at: UtcTime | None = None
    agent_run_id: str | None = None
    agent_run_ids: list[str] = Field(default_factory=list)
    cancelled_agent_run_ids: list[str] = Field(default_factory=list)
    # Steps each agent run took (what the agent API bills), as far as the workers saw them.
    agent_steps: dict[str, int] = Field(default_factory=dict)
    last_activity: str | None = None

    @property
    def total_agent_steps(self) -> int:
        return sum(self.agent_steps.values())


class ProviderLease(CamelModel):
    """Who works on a provider now, until when, and how many deliveries claimed it so far."""

    owner: str
    until: UtcTime
    deliveries: int


class RunRecord(CamelModel):
    """A run as the store assembles it: the API's view (status, providers, quotes) plus the
    workers' private state. Never holds the driver's personal data."""

    run_id: str
    status: RunStatus = "processing"
    created_at: UtcTime
    updated_at: UtcTime
    deadline: UtcTime
    coverage: Coverage
    providers: list[ProviderState]
    error: ErrorInfo | None = None
    ended_at: UtcTime | None = None
    priced: PricedRequest | None = None
    work: dict[ProviderId, ProviderWork] = Field(default_factory=dict, exclude=True)
    leases: dict[ProviderId, ProviderLease] = Field(default_factory=dict, exclude=True)
    finished_at: dict[ProviderId, UtcTime] = Field(default_factory=dict, exclude=True)
    agent_steps: dict[ProviderId, int] = Field(default_factory=dict, exclude=True)

    def provider(self, provider: ProviderId) -> ProviderState:
        return next(p for p in self.providers if p.provider == provider)

    @property
    def meta(self) -> RunMeta:
        return RunMeta(
            run_id=self.run_id,
            created_at=self.created_at,
            deadline=self.deadline,
            coverage=self.coverage,
            providers=[p.provider for p in self.providers],
            priced=self.priced,
        )

    @property
    def completed(self) -> int:
        return sum(p.status in ("quoted", "failed") for p in self.providers)

    @property
    def quotes(self) -> list[Quote]:
        return cheapest_first([p.quote for p in self.providers if p.quote is not None])


class Progress(CamelModel):
    completed: int
    total: int
    percent: int


class RunAccepted(CamelModel):
    run_id: str
    status: RunStatus
    status_url: str
    stream_url: str
    cancel_token: str = Field(
        repr=False,
        description="The one credential that cancels this run (DELETE, Authorization: Bearer);"
        " given only to whoever started it.",
    )

    @classmethod
    def for_run(cls, run_id: str, cancel_token: str) -> RunAccepted:
        return cls(
            run_id=run_id,
            status="processing",
            status_url=f"/api/quotes/{run_id}",
            stream_url=f"/api/quotes/{run_id}/stream",
            cancel_token=cancel_token,
        )


class RunSnapshot(CamelModel):
    run_id: str
    status: RunStatus
    created_at: UtcTime
    updated_at: UtcTime
    expires_at: UtcTime
    progress: Progress
    providers: list[ProviderState]
    quotes: list[Quote]
    last_event_id: int
    stream_url: str
    priced: PricedRequest | None = Field(
        default=None, description="What the run priced, without the driver's personal data."
    )
    error: ErrorInfo | None = None
    events: list[dict[str, Any]] | None = None


# --- problem details (RFC 9457), the body of every error response ---------------------------------


class FieldError(CamelModel):
    field: str = Field(description="The field's dotted camelCase path, e.g. driver.dateOfBirth.")
    message: str


class ProblemDetail(CamelModel):
    """An RFC 9457 problem detail, sent as application/problem+json."""

    type: str = Field(description="A stable URI naming the kind of problem.")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    errors: list[FieldError] | None = Field(
        default=None, description="Each invalid field, on a validation error (422)."
    )


class HealthReport(CamelModel):
    """GET /api/health when this deployment can run quotes. Never holds a secret."""

    status: Literal["ok"] = "ok"
    store: Literal["kv", "sqlite"]
    queue: Literal["vercel", "local"]
    source: QuoteSourceName
