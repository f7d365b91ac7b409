"""What a finished agent run's `result` amounts to: a Quote, or the ProviderError it means.
Read leniently (camelCase, amounts as "$1,234.50", a 6-month total), judged strictly (a premium
must be plausible, in USD, with a deductible)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from lib.models import PROVIDER_NAMES, ProviderId, Quote, QuoteRequest, utc_now
from lib.providers.base import ProviderBadOutput, ProviderBlocked, ProviderDeclined

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

BLOCKED_WORDS = re.compile(
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
_MONEY = re.compile(
    r"(?:USD\s*)?\$?\s*(?P<amount>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)\s*(?:USD)?"
    r"\s*(?:/\s*mo(?:nth)?\.?|per month|a month|monthly)?",
    re.IGNORECASE,
)


def clip(text: str, limit: int) -> str:
    """One line of at most `limit` characters (an ellipsis marks a cut)."""
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
    reason = clip(redact(parsed.reason), MAX_REASON_CHARS) if parsed.reason else None

    monthly = parsed.monthly_premium
    if monthly is None and parsed.term_premium is not None and parsed.term_months:
        monthly = parsed.term_premium / parsed.term_months

    outcome = parsed.outcome
    if outcome is None and monthly is None:
        # No verdict and no price: a free-form answer; read its reason for one.
        if reason and BLOCKED_WORDS.search(reason):
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
