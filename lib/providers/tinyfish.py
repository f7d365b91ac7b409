"""The TinyFish web-agent quote source (the agent API formerly called Mino).

One quote is one agent run: POST {TINYFISH_API_URL}/v1/automation/run-sse with `X-API-Key`
and `{"url": <insurer's quote start page>, "goal": <instructions>, "output_schema": <quote schema>,
"browser_profile": "stealth", "proxy_config": {"enabled": true, "country_code": "US"}}`.
The answer is Server-Sent Events whose `data:` JSON has a `type`: STARTED (`run_id`),
STREAMING_URL, PROGRESS (`purpose`: what the agent is doing), HEARTBEAT, and COMPLETE (`status`
COMPLETED / FAILED / CANCELLED, `result`, `error` = {code, message, category, retry_after}).
Field names follow TinyFish's API reference and its official Python SDK (`tinyfish` 0.11.0).

Spoken over httpx + httpx-sse rather than the SDK: both are already run-time dependencies, while
the SDK adds tenacity and its own retry loop (we retry in lib.providers.retry, within the
provider's budget).

The driver's personal data (name, date of birth) leaves the system only inside the goal. It is
never logged and never put in an exception; text that comes back from the agent (progress
purposes, failure reasons) has the driver's name and date of birth masked before it is used.

`output_schema` is a beta feature of TinyFish: an account without it gets 403 FORBIDDEN. The goal
also spells out the JSON wanted, so on that 403 the source drops `output_schema` (for this
request and every later one) and asks again once.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import AsyncIterator, Callable
from datetime import date
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx
from httpx_sse import ServerSentEvent, SSEError, aconnect_sse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from lib.models import PROVIDER_NAMES, Coverage, ProviderId, Quote, QuoteRequest, utc_now
from lib.providers.base import (
    ProviderAuth,
    ProviderBadOutput,
    ProviderBlocked,
    ProviderDeclined,
    ProviderError,
    ProviderRequestRejected,
    ProviderUnavailable,
    ReportActivity,
)

logger = logging.getLogger(__name__)

RUN_SSE_PATH = "/v1/automation/run-sse"

# Where each insurer's public online auto quote starts (the page with the ZIP-code box).
INSURER_START_URLS: dict[ProviderId, str] = {
    "geico": "https://www.geico.com/auto-insurance/",
    "progressive": "https://www.progressive.com/auto/",
    "state_farm": "https://www.statefarm.com/insurance/auto",
    "allstate": "https://www.allstate.com/auto-insurance",
    "liberty_mutual": "https://www.libertymutual.com/auto-insurance",
}

COVERAGE_INSTRUCTIONS: dict[Coverage, str] = {
    "minimum": "the state's minimum required liability limits only, with no collision or "
    "comprehensive coverage",
    "standard": "liability limits of 100/300/100 plus collision and comprehensive coverage with a "
    "$1,000 deductible (or the closest the site offers)",
    "full": "liability limits of 250/500/250, uninsured motorist coverage, plus collision and "
    "comprehensive coverage with a $500 deductible (or the closest the site offers)",
}

# The result we ask the agent for. Only keywords TinyFish's structured-output validator accepts
# (type, properties, required, nullable, enum, minimum, maximum, propertyOrdering…): no
# "description", no "additionalProperties", nullable instead of type lists.
QUOTE_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "outcome": {"type": "string", "enum": ["quoted", "no_quote", "blocked"]},
        "monthly_premium": {"type": "number", "minimum": 0, "nullable": True},
        "term_premium": {"type": "number", "minimum": 0, "nullable": True},
        "term_months": {"type": "integer", "minimum": 1, "maximum": 12, "nullable": True},
        "deductible": {"type": "integer", "minimum": 0, "nullable": True},
        "currency": {"type": "string", "nullable": True},
        "reason": {"type": "string", "nullable": True},
    },
    "required": ["outcome"],
    "propertyOrdering": [
        "outcome",
        "monthly_premium",
        "term_premium",
        "term_months",
        "deductible",
        "currency",
        "reason",
    ],
}

MAX_ACTIVITY_CHARS = 200
MAX_REASON_CHARS = 160
MIN_MONTHLY_PREMIUM = 5.0
MAX_MONTHLY_PREMIUM = 5_000.0
# Generous: the agent can think for a while between events; HEARTBEATs keep the stream alive.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=90.0, write=10.0, pool=10.0)

_BLOCKED_WORDS = re.compile(
    r"captcha|bot[\s-]?(?:wall|detect|protect|check)|blocked|access denied|verify (?:you|that you)"
    r"(?: are|'re) (?:a )?human|are you a robot|cloudflare|perimeterx|akamai|datadome|"
    r"unusual traffic|forbidden",
    re.IGNORECASE,
)
_DECLINED_WORDS = re.compile(
    r"no quote|not (?:able|eligible)|unable to (?:offer|provide|quote)|cannot (?:offer|provide|"
    r"quote)|declin|ineligible|not available|call (?:an agent|us)|contact an agent",
    re.IGNORECASE,
)
_BILLING_WORDS = re.compile(
    r"insufficient (?:credit|funds|balance)|out of credit|no credits|credit limit|billing|quota",
    re.IGNORECASE,
)
_MONEY = re.compile(
    r"(?:USD\s*)?\$?\s*(?P<amount>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)\s*(?:USD)?"
    r"\s*(?:/\s*mo(?:nth)?\.?|per month|a month|monthly)?",
    re.IGNORECASE,
)
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,48}")


def build_goal(request: QuoteRequest, provider: ProviderId) -> str:
    """The agent's instructions. The only place the driver's personal data is written out."""
    name = PROVIDER_NAMES[provider]
    driver = request.driver
    vehicle = request.vehicle
    return "\n".join(
        [
            f"Get an online auto insurance price quote from {name}, starting on this page.",
            "",
            "Use exactly these details:",
            f"- Vehicle: look it up by VIN {request.vin} (use the VIN lookup if the site has one; "
            "otherwise choose the year, make and model that VIN decodes to).",
            f"- Garaging ZIP code: {request.zip}",
            f"- Driver: {driver.first_name} {driver.last_name}, date of birth "
            f"{driver.date_of_birth.isoformat()} (YYYY-MM-DD), the only driver and the owner.",
            f"- Annual mileage: {vehicle.annual_mileage:,} miles; primary use: {vehicle.use}; "
            f"the vehicle is {vehicle.ownership}.",
            f"- Coverage: {COVERAGE_INSTRUCTIONS[request.coverage]}.",
            "- Any other question (address line, driving history, prior insurance, marital "
            "status…): give the most ordinary answer — no accidents, violations or claims, "
            "continuously insured; skip optional questions where possible.",
            "",
            "Rules:",
            "- Stop as soon as the quote page shows a price. Never buy, bind, pay for, sign, "
            "e-sign or submit anything that starts a policy, and never enter payment details.",
            "- Do not create an account or set a password unless the site gives no other way to "
            "see a price; if it insists, stop and report no quote.",
            "- If a CAPTCHA, bot check or access-denied page blocks you, stop and report "
            '"blocked". Do not try to solve or bypass it.',
            "- If the site says it cannot quote online (for example, asks you to call an agent), "
            'stop and report "no_quote" with the reason.',
            "- In your step descriptions, do not repeat the driver's name or date of birth.",
            "",
            "Return one JSON object:",
            '{"outcome": "quoted" | "no_quote" | "blocked", "monthly_premium": number or null, '
            '"term_premium": number or null, "term_months": integer or null, '
            '"deductible": integer or null, "currency": "USD", "reason": string or null}',
            "- monthly_premium: the monthly price in US dollars as a plain number (142.5). If the "
            "site shows only a total for the policy term (for example 6 months), put that total "
            "in term_premium and the number of months in term_months.",
            "- deductible: the collision/comprehensive deductible in dollars (0 if none).",
            "- reason: for no_quote or blocked, a short reason in your own words.",
        ]
    )


def _redactor(request: QuoteRequest) -> Callable[[str], str]:
    """Masks the driver's name and date of birth in text that comes back from the agent."""
    driver = request.driver
    born: date = driver.date_of_birth
    needles = {
        driver.first_name.strip(),
        driver.last_name.strip(),
        f"{driver.first_name.strip()} {driver.last_name.strip()}",
        born.isoformat(),
        f"{born.month:02d}/{born.day:02d}/{born.year}",
        f"{born.month}/{born.day}/{born.year}",
        f"{born.month:02d}-{born.day:02d}-{born.year}",
        f"{born.day:02d}/{born.month:02d}/{born.year}",
        f"{born.strftime('%B')} {born.day}, {born.year}",
        f"{born.strftime('%b')} {born.day}, {born.year}",
        f"{born.day} {born.strftime('%B')} {born.year}",
    }
    pieces = sorted((n for n in needles if len(n) >= 2), key=len, reverse=True)
    alternatives = "|".join(re.escape(p) for p in pieces)
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def redact(text: str) -> str:
        return pattern.sub("[redacted]", text)

    return redact


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def parse_money(value: Any) -> float | None:
    """A non-negative amount from a number or a string such as "$1,234.50" or "142.50/mo";
    None for null. Anything else (a range, words, a negative) is not an amount."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("not an amount")
    if isinstance(value, int | float):
        amount = float(value)
    elif isinstance(value, str):
        match = _MONEY.fullmatch(value.strip())
        if match is None:
            raise ValueError("not an amount")
        amount = float(match["amount"].replace(",", ""))
    else:
        raise ValueError("not an amount")
    if not math.isfinite(amount) or amount < 0:
        raise ValueError("not an amount")
    return amount


class AgentQuoteResult(BaseModel):
    """What the agent returned, read leniently (camelCase accepted, amounts may be strings)."""

    model_config = ConfigDict(extra="ignore")

    outcome: Literal["quoted", "no_quote", "blocked"] | None = None
    monthly_premium: float | None = Field(
        None, validation_alias=AliasChoices("monthly_premium", "monthlyPremium")
    )
    term_premium: float | None = Field(
        None, validation_alias=AliasChoices("term_premium", "termPremium")
    )
    term_months: int | None = Field(
        None, ge=1, le=12, validation_alias=AliasChoices("term_months", "termMonths")
    )
    deductible: float | None = None
    currency: str | None = None
    reason: str | None = Field(
        None, validation_alias=AliasChoices("reason", "no_quote_reason", "message")
    )

    @field_validator("outcome", mode="before")
    @classmethod
    def _outcome_words(cls, value: Any) -> Any:
        if isinstance(value, str):
            word = value.strip().lower().replace("-", "_").replace(" ", "_")
            return {"declined": "no_quote", "noquote": "no_quote", "quote": "quoted"}.get(
                word, word
            )
        return value

    @field_validator("monthly_premium", "term_premium", "deductible", mode="before")
    @classmethod
    def _amount(cls, value: Any) -> float | None:
        return parse_money(value)

    @field_validator("reason", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return value if value is None or isinstance(value, str) else str(value)


def quote_from_result(
    result: Any, request: QuoteRequest, provider: ProviderId, redact: Callable[[str], str]
) -> Quote:
    """The Quote in a COMPLETED run's result, or the ProviderError that result amounts to."""
    name = PROVIDER_NAMES[provider]
    if isinstance(result, str):
        try:
            result = json.loads(result)
        except ValueError:
            raise ProviderBadOutput(f"{name}'s agent returned text instead of a quote") from None
    if not isinstance(result, dict):
        raise ProviderBadOutput(f"{name}'s agent returned no quote object")
    try:
        parsed = AgentQuoteResult.model_validate(result)
    except ValidationError as exc:
        fields = sorted({str(err["loc"][0]) for err in exc.errors() if err["loc"]})
        raise ProviderBadOutput(
            f"{name}'s agent returned a quote that does not fit ({', '.join(fields) or 'shape'})"
        ) from None
    reason = _clip(redact(parsed.reason), MAX_REASON_CHARS) if parsed.reason else None

    monthly = parsed.monthly_premium
    if monthly is None and parsed.term_premium is not None and parsed.term_months:
        monthly = parsed.term_premium / parsed.term_months

    outcome = parsed.outcome
    if outcome is None and monthly is None:
        # No verdict and no price: a free-form answer; read its reason for one.
        if reason and _BLOCKED_WORDS.search(reason):
            outcome = "blocked"
        elif reason and _DECLINED_WORDS.search(reason):
            outcome = "no_quote"
    if outcome == "blocked":
        raise ProviderBlocked(f"{name}'s site blocked the web agent" + _because(reason))
    if outcome == "no_quote":
        raise ProviderDeclined(f"{name} offered no quote online" + _because(reason))
    if monthly is None:
        raise ProviderBadOutput(f"{name}'s agent finished without a monthly premium")
    if not MIN_MONTHLY_PREMIUM <= monthly <= MAX_MONTHLY_PREMIUM:
        raise ProviderBadOutput(f"{name}'s agent read an implausible premium")
    if parsed.currency is not None and parsed.currency.strip().upper() not in ("USD", "$", "US$"):
        raise ProviderBadOutput(f"{name}'s agent returned a premium in a currency other than USD")
    if parsed.deductible is None:
        if request.coverage != "minimum":
            raise ProviderBadOutput(f"{name}'s agent finished without the deductible")
        deductible = 0
    elif parsed.deductible != int(parsed.deductible):
        raise ProviderBadOutput(f"{name}'s agent returned a deductible that is not whole dollars")
    else:
        deductible = int(parsed.deductible)
    monthly = round(monthly, 2)
    return Quote(
        provider=provider,
        monthly_premium=monthly,
        annual_premium=round(monthly * 12, 2),
        coverage=request.coverage,
        deductible=deductible,
        source="tinyfish",
        quoted_at=utc_now(),
    )


def _because(reason: str | None) -> str:
    return f": {reason}" if reason else ""


def error_from_failed_run(
    status: str, error: Any, provider: ProviderId, redact: Callable[[str], str]
) -> ProviderError:
    """The ProviderError for a COMPLETE event whose status is FAILED or CANCELLED."""
    name = PROVIDER_NAMES[provider]
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        raw_code = error.get("code")
        category = str(error.get("category") or "").upper()
        retry_after = error.get("retry_after")
    else:
        message = "" if error is None else str(error)
        raw_code, category, retry_after = None, "", None
    code = raw_code if isinstance(raw_code, str) and _ERROR_CODE.fullmatch(raw_code) else None
    detail = _clip(redact(message), MAX_REASON_CHARS) if message else (code or "")
    suffix = f": {detail}" if detail else ""
    if _BLOCKED_WORDS.search(f"{message} {code or ''}"):
        return ProviderBlocked(f"{name}'s site blocked the web agent{suffix}")
    if category == "BILLING_FAILURE" or (
        category not in ("SYSTEM_FAILURE", "AGENT_FAILURE")
        and _BILLING_WORDS.search(f"{message} {code or ''}")
    ):
        return ProviderAuth(f"TinyFish refused the run for billing reasons{suffix}")
    wait = float(retry_after) if isinstance(retry_after, int | float) and retry_after > 0 else None
    if status == "CANCELLED":
        return ProviderUnavailable(f"TinyFish's run for {name} was cancelled{suffix}")
    return ProviderUnavailable(f"TinyFish's run for {name} failed{suffix}", retry_after=wait)


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - utc_now()).total_seconds())


def _api_error_code(response: httpx.Response) -> str | None:
    """TinyFish's machine-readable `error.code` (free text is not kept: it may echo our input)."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else None


class _OutputSchemaForbidden(Exception):
    """HTTP 403 to a request carrying output_schema: maybe the account lacks the beta feature."""


def error_from_response(response: httpx.Response) -> ProviderError:
    """The ProviderError for a non-2xx answer to the run request."""
    status = response.status_code
    code = _api_error_code(response)
    what = f"HTTP {status}" + (f" {code}" if code else "")
    if status in (401, 403):
        return ProviderAuth(f"TinyFish refused our API key ({what})")
    if status == 402:
        return ProviderAuth(f"TinyFish account is out of credit ({what})")
    if status == 429:
        return ProviderUnavailable(
            f"TinyFish rate-limited us ({what})",
            retry_after=_retry_after_seconds(response.headers.get("retry-after")),
        )
    if status == 408 or status >= 500:
        return ProviderUnavailable(f"TinyFish returned {what}")
    return ProviderRequestRejected(f"TinyFish rejected the run request ({what})")


class TinyFishQuoteSource:
    """Quotes read off the insurers' own sites by TinyFish web agents."""

    name = "tinyfish"

    def __init__(
        self,
        *,
        api_key: str,
        api_url: str = "https://agent.tinyfish.ai",
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        browser_profile: Literal["lite", "stealth"] = "stealth",
        proxy_country: str | None = "US",
    ) -> None:
        self._api_key = api_key
        self._endpoint = api_url.rstrip("/") + RUN_SSE_PATH
        self._timeout = timeout
        self._transport = transport
        self._browser_profile = browser_profile
        self._proxy_country = proxy_country
        self._client: httpx.AsyncClient | None = None
        self._send_output_schema = True

    def __repr__(self) -> str:
        return f"TinyFishQuoteSource(endpoint={self._endpoint!r})"

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self._timeout,
                transport=self._transport,
                headers={"User-Agent": "quote-runs/0.1 (+httpx)"},
            )
        return self._client

    def run_body(self, request: QuoteRequest, provider: ProviderId) -> dict[str, Any]:
        body: dict[str, Any] = {
            "url": INSURER_START_URLS[provider],
            "goal": build_goal(request, provider),
            "browser_profile": self._browser_profile,
        }
        if self._proxy_country:
            body["proxy_config"] = {"enabled": True, "country_code": self._proxy_country}
        if self._send_output_schema:
            body["output_schema"] = QUOTE_OUTPUT_SCHEMA
        return body

    async def get_quote(
        self, request: QuoteRequest, provider: ProviderId, report: ReportActivity
    ) -> Quote:
        redact = _redactor(request)
        body = self.run_body(request, provider)
        try:
            return await self._run(body, request, provider, report, redact)
        except _OutputSchemaForbidden:
            logger.warning(
                "TinyFish answered 403 to a run with output_schema; retrying without it "
                "(structured output is a beta feature this account may not have)"
            )
            self._send_output_schema = False
            body.pop("output_schema")
            try:
                return await self._run(body, request, provider, report, redact)
            except _OutputSchemaForbidden:
                raise ProviderAuth("TinyFish refused our API key (HTTP 403)") from None

    async def _run(
        self,
        body: dict[str, Any],
        request: QuoteRequest,
        provider: ProviderId,
        report: ReportActivity,
        redact: Callable[[str], str],
    ) -> Quote:
        name = PROVIDER_NAMES[provider]
        try:
            async with aconnect_sse(
                self._http(),
                "POST",
                self._endpoint,
                json=body,
                headers={"X-API-Key": self._api_key},
            ) as events:
                response = events.response
                if not response.is_success:
                    await response.aread()
                    error = error_from_response(response)
                    logger.warning("TinyFish run for %s refused: %s", provider, error.message)
                    if response.status_code == 403 and "output_schema" in body:
                        raise _OutputSchemaForbidden
                    raise error
                quote = await self._follow(events.aiter_sse(), request, provider, report, redact)
        except httpx.TimeoutException:
            raise ProviderUnavailable(
                f"TinyFish went silent during {name}'s run (timed out)"
            ) from None
        except (httpx.TransportError, SSEError) as exc:
            logger.warning("TinyFish stream for %s broke: %s", provider, type(exc).__name__)
            raise ProviderUnavailable(f"TinyFish's stream broke off during {name}'s run") from None
        if quote is None:
            raise ProviderUnavailable(f"TinyFish's stream for {name} ended before the run finished")
        return quote

    async def _follow(
        self,
        stream: AsyncIterator[ServerSentEvent],
        request: QuoteRequest,
        provider: ProviderId,
        report: ReportActivity,
        redact: Callable[[str], str],
    ) -> Quote | None:
        """Reports each PROGRESS purpose; the quote at COMPLETE; None if the stream ends first."""
        async for sse in stream:
            event = _event_json(sse.data)
            if event is None:
                continue
            kind = event.get("type")
            if kind == "STARTED":
                run_id = event.get("run_id") or event.get("runId")
                logger.info("TinyFish run %s started for %s", run_id, provider)
            elif kind == "PROGRESS":
                purpose = event.get("purpose")
                if isinstance(purpose, str) and purpose.strip():
                    await report(_clip(redact(purpose), MAX_ACTIVITY_CHARS))
            elif kind == "COMPLETE":
                return self._complete(event, request, provider, redact)
        return None

    def _complete(
        self,
        event: dict[str, Any],
        request: QuoteRequest,
        provider: ProviderId,
        redact: Callable[[str], str],
    ) -> Quote:
        status = str(event.get("status") or "").upper()
        run_id = event.get("run_id") or event.get("runId")
        logger.info("TinyFish run %s for %s finished: %s", run_id, provider, status or "?")
        if status == "COMPLETED":
            result = event["result"] if "result" in event else event.get("resultJson")
            return quote_from_result(result, request, provider, redact)
        raise error_from_failed_run(status, event.get("error"), provider, redact)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _event_json(data: str) -> dict[str, Any] | None:
    """One event's JSON object, or None for an empty or malformed `data:` (skipped, not fatal)."""
    if not data.strip():
        return None
    try:
        event = json.loads(data)
    except ValueError:
        logger.debug("skipped a TinyFish event whose data is not JSON (%d chars)", len(data))
        return None
    return event if isinstance(event, dict) else None
