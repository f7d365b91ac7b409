"""A run's cancel token: the one credential that cancels it, given only to whoever started it.

It is an HMAC-SHA256 of the run id keyed by the deployment's secret, so nothing about it is
stored: POST computes it for the 202 (and again for an idempotent replay's 200), DELETE computes
it again and compares in constant time. Without the secret it cannot be guessed (256 bits).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

# Keeps these HMACs apart from the secret's other uses (idempotency body hashes).
_PURPOSE = b"quote-runs cancel token\0"


def cancel_token(secret: bytes, run_id: str) -> str:
    digest = hmac.new(secret, _PURPOSE + run_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def bearer_token(authorization: str | None) -> str | None:
    """The credential of an `Authorization: Bearer <credential>` header, else None."""
    if authorization is None:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip()


def is_cancel_token(secret: bytes, run_id: str, presented: str) -> bool:
    expected = cancel_token(secret, run_id).encode()
    return hmac.compare_digest(expected, presented.encode("utf-8", "surrogateescape"))
