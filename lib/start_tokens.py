"""Start tokens: short-lived JWTs the operator's own backend mints so a browser can start one run.

HS256 signed with QUOTES_SECRET, `aud` "quotes", `exp` at most ten minutes ahead, a `jti`, and
optionally `sub` (whose runs these are) and `providers` (the run may use only these). PyJWT does
the cryptography; it is imported only when a token is actually verified, so the functions that
only read runs never pay for it.
"""

from __future__ import annotations

from typing import NamedTuple

from lib.terms import PROVIDER_IDS, ProviderId

AUDIENCE = "quotes"
MAX_LIFETIME_SECONDS = 600
# Tolerated clock difference between the minting backend and this function.
CLOCK_SKEW_SECONDS = 30
_MAX_CLAIM_LENGTH = 255


class StartTokenRefused(Exception):
    """The Bearer credential is not a start token this deployment accepts (says why)."""


class StartToken(NamedTuple):
    jti: str
    expires_at: float
    subject: str | None = None
    providers: tuple[ProviderId, ...] | None = None


def looks_like_jwt(credential: str) -> bool:
    return credential.count(".") == 2


def _text_claim(claims: dict[str, object], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= _MAX_CLAIM_LENGTH:
        raise StartTokenRefused(f"the token's {name} must be a string of 1 to 255 characters")
    return value


def _providers_claim(claims: dict[str, object]) -> tuple[ProviderId, ...] | None:
    value = claims.get("providers")
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise StartTokenRefused("the token's providers claim must be a non-empty list")
    known = [p for p in PROVIDER_IDS if p in value]
    if len(known) != len(value):
        raise StartTokenRefused("the token's providers claim names an unknown provider")
    return tuple(known)


def verify_start_token(token: str, secret: bytes, now: float) -> StartToken:
    """The token's claims, once its signature, audience, expiry and lifetime check out."""
    import jwt

    try:
        claims: dict[str, object] = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            audience=AUDIENCE,
            leeway=CLOCK_SKEW_SECONDS,
            options={"require": ["exp", "aud", "jti"]},
        )
    except jwt.ExpiredSignatureError:
        raise StartTokenRefused("the start token has expired") from None
    except jwt.InvalidAudienceError:
        raise StartTokenRefused(f"the start token's aud must be {AUDIENCE!r}") from None
    except jwt.MissingRequiredClaimError as error:
        raise StartTokenRefused(f"the start token has no {error.claim} claim") from None
    except jwt.InvalidTokenError:
        raise StartTokenRefused("the start token is malformed or its signature is wrong") from None
    expires_at = claims["exp"]
    assert isinstance(expires_at, int | float)  # PyJWT checked it is a number
    if expires_at > now + MAX_LIFETIME_SECONDS + CLOCK_SKEW_SECONDS:
        raise StartTokenRefused(
            f"the start token lives too long: exp must be at most {MAX_LIFETIME_SECONDS} s ahead"
        )
    jti = _text_claim(claims, "jti")
    assert jti is not None  # required above
    return StartToken(
        jti=jti,
        expires_at=float(expires_at),
        subject=_text_claim(claims, "sub"),
        providers=_providers_claim(claims),
    )
