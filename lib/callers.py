"""Who is starting a run: the client's address (as the platform saw it) and the credential it
presented — an API key, a start token, or none. The run's idempotency scope and spend ceiling
follow from it.

API keys are compared in constant time against every configured key, so neither timing nor an
early exit tells a guesser how close it came.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from typing import NamedTuple

from starlette.requests import Request

from lib.config import Settings
from lib.start_tokens import StartToken, StartTokenRefused, looks_like_jwt, verify_start_token


class CredentialsRequired(Exception):
    """This deployment needs a Bearer credential and the request had none."""


class CredentialsRefused(Exception):
    """A Bearer credential was sent but is neither a configured API key nor a valid start token,
    or the start token already started a run."""


class PaidDeploymentOpen(Exception):
    """A deployment with a paid quote source was left without credentials and not declared
    public: starting runs is refused until the operator decides."""


class Caller(NamedTuple):
    """`address` is the client's address (an IPv6 client's /64); `key_id` a short hash of the API
    key used, or None; `token` the verified start token, or None."""

    address: str
    key_id: str | None = None
    token: StartToken | None = None

    @property
    def subject(self) -> str | None:
        """Whose runs count against a per-caller ceiling: the key, the token's subject (tokens
        without one share a bucket), or None for an anonymous caller."""
        if self.key_id is not None:
            return f"key:{self.key_id}"
        if self.token is not None:
            return f"sub:{self.token.subject}" if self.token.subject else "token"
        return None

    @property
    def idempotency_scope(self) -> str:
        """The namespace of this caller's Idempotency-Keys: no caller can reach another's."""
        if self.key_id is not None:
            return f"key:{self.key_id}"
        if self.token is not None:
            return f"sub:{self.token.subject}" if self.token.subject else f"jti:{self.token.jti}"
        return f"address:{self.address}"


def _first(value: str | None) -> str:
    return (value or "").split(",", 1)[0].strip()


def normalise_address(raw: str) -> str:
    """An IPv4 address as is, an IPv6 address as its /64 (one subscriber's usual allocation)."""
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        return raw[:64] or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def client_address(request: Request, settings: Settings) -> str:
    """On Vercel, the address its edge saw (it overwrites these headers; a client cannot set
    them); anywhere else the TCP peer, never a header."""
    raw = ""
    if settings.on_vercel:
        raw = _first(request.headers.get("x-vercel-forwarded-for")) or _first(
            request.headers.get("x-real-ip")
        )
    if not raw and request.client is not None:
        raw = request.client.host
    return normalise_address(raw)


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _matching_key(credential: str, keys: tuple[str, ...]) -> str | None:
    presented = hashlib.sha256(credential.encode()).digest()
    matched = None
    for key in keys:  # every key, always: the loop's length does not depend on the credential
        if hmac.compare_digest(presented, hashlib.sha256(key.encode()).digest()):
            matched = key
    return matched


def bearer_credential(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, credential = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise CredentialsRefused("send the credential as Authorization: Bearer <key or token>")
    return credential.strip()


def identify_caller(request: Request, settings: Settings) -> Caller:
    """The caller, once its credential (if any) checks out. Raises PaidDeploymentOpen,
    CredentialsRequired or CredentialsRefused."""
    if settings.open_wallet:
        raise PaidDeploymentOpen(
            "This deployment quotes through TinyFish, which bills its operator, and nothing "
            "guards it. Set QUOTES_API_KEYS (and QUOTES_SECRET for browser start tokens), or "
            "set QUOTES_PUBLIC=1 to let anyone start runs, then redeploy."
        )
    address = client_address(request, settings)
    try:
        credential = bearer_credential(request)
    except CredentialsRefused:
        if settings.requires_credentials:
            raise
        credential = None
    if credential is None:
        if settings.requires_credentials:
            raise CredentialsRequired("send Authorization: Bearer <API key or start token>")
        return Caller(address)
    matched = _matching_key(credential, settings.api_keys)
    if matched is not None:
        return Caller(address, key_id=key_id(matched))
    try:
        if settings.token_secret is None or not looks_like_jwt(credential):
            raise CredentialsRefused("the credential is not an API key of this deployment")
        try:
            token = verify_start_token(credential, settings.token_secret, time.time())
        except StartTokenRefused as error:
            raise CredentialsRefused(str(error)) from None
    except CredentialsRefused:
        if settings.requires_credentials:
            raise
        # An open deployment: a credential it cannot use changes nothing (a page may send a key
        # it was given for another deployment); a valid start token still applies.
        return Caller(address)
    return Caller(address, token=token)
