"""Settings, read from the environment once into one typed object; nothing else reads os.environ."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from lib.terms import PROVIDER_IDS, ProviderId, QuoteSourceName

DEFAULT_TINYFISH_API_URL = "https://agent.tinyfish.ai"


class ConfigError(ValueError):
    """An environment variable has a value the service cannot use."""


@dataclass(frozen=True, slots=True)
class KVCredentials:
    url: str
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Settings:
    kv: KVCredentials | None
    db_path: str
    run_ttl_seconds: int
    tinyfish_api_key: str | None = field(repr=False)
    tinyfish_api_url: str
    providers: tuple[ProviderId, ...]
    provider_timeout_seconds: float
    stream_max_seconds: float | None
    run_max_seconds: float
    secret: bytes = field(repr=False)
    cors_allow_origins: tuple[str, ...]
    run_lease_seconds: float
    simulated_delay_scale: float
    simulated_min_seconds: float
    tinyfish_max_steps: int | None
    rate_limit_per_minute: int
    on_vercel_deployment: bool
    on_vercel: bool = False
    queue_base_url: str | None = None
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # QUOTES_SECRET as set (never derived): start tokens are accepted only when the operator set it.
    token_secret: bytes | None = field(default=None, repr=False)
    quotes_public: bool = False
    runs_per_day: int = 200
    runs_per_day_total: int = 200
    # Agent runs in flight across the deployment (all runs, all instances); None: no limit.
    tinyfish_max_concurrency: int | None = None

    @property
    def queue_backend(self) -> Literal["vercel", "local"] | None:
        """Vercel Queues on Vercel (OIDC), a local queue where VERCEL_QUEUE_BASE_URL is set."""
        if self.on_vercel:
            return "vercel"
        if self.queue_base_url:
            return "local"
        return None

    @property
    def quote_source(self) -> QuoteSourceName:
        """The source lib.providers.build_quote_source builds."""
        return "tinyfish" if self.tinyfish_api_key else "simulated"

    @property
    def requires_credentials(self) -> bool:
        return bool(self.api_keys)

    @property
    def paid_source(self) -> bool:
        """Runs cost the operator money: the TinyFish agent source is configured."""
        return self.quote_source == "tinyfish"

    @property
    def open_wallet(self) -> bool:
        """A public deployment would let anyone spend the operator's agent credit."""
        return (
            self.on_vercel_deployment
            and self.paid_source
            and not self.requires_credentials
            and not self.quotes_public
        )


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def _max_steps(raw: str) -> int | None:
    """TINYFISH_MAX_STEPS: a whole number of agent steps, 1–500 (TinyFish's own bounds)."""
    if not raw.strip():
        return None
    if not raw.strip().isascii() or not raw.strip().isdigit() or not 1 <= int(raw) <= 500:
        raise ConfigError(f"TINYFISH_MAX_STEPS must be a whole number from 1 to 500, got {raw!r}")
    return int(raw)


def _max_concurrency(raw: str) -> int | None:
    """TINYFISH_MAX_CONCURRENCY: a whole number of agent runs, at least 1; unset is no limit."""
    if not raw.strip():
        return None
    if not raw.strip().isascii() or not raw.strip().isdigit() or int(raw) < 1:
        raise ConfigError(
            f"TINYFISH_MAX_CONCURRENCY must be a whole number of at least 1, got {raw!r}"
        )
    return int(raw)


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


def _providers(raw: str) -> tuple[ProviderId, ...]:
    if not raw.strip():
        return PROVIDER_IDS
    chosen: list[ProviderId] = []
    for name in (part.strip() for part in raw.split(",")):
        if not name:
            continue
        if name not in PROVIDER_IDS:
            raise ConfigError(f"QUOTE_PROVIDERS names an unknown provider {name!r}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ConfigError("QUOTE_PROVIDERS is set but names no provider")
    return tuple(chosen)


def _kv_credentials(env: Mapping[str, str]) -> KVCredentials | None:
    for url_name, token_name in (
        ("KV_REST_API_URL", "KV_REST_API_TOKEN"),
        ("UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN"),
    ):
        url, token = env.get(url_name, "").strip(), env.get(token_name, "").strip()
        if url and token:
            return KVCredentials(url=url.rstrip("/"), token=token)
    return None


def default_db_path() -> str:
    """The embedded store's file when QUOTES_DB_PATH is unset: one absolute path per user.

    `vercel dev` runs each function instance in its own temporary copy of the code, with that copy
    as its working directory, so a path relative to the code or the cwd is a different file in each.
    The user's data folder is the same for every instance under `make dev` and `vercel dev`.
    """
    if sys.platform == "win32":
        return str(Path.home() / "AppData" / "Local" / "quote-runs" / "quotes.sqlite3")
    import pwd

    try:
        # The account's home, not $HOME: `vercel dev` does not pass $HOME to its functions.
        home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:  # a user with no account entry (a bare container)
        return str(Path(tempfile.gettempdir()) / f"quote-runs-{os.getuid()}" / "quotes.sqlite3")
    data = (
        home / "Library" / "Application Support"
        if sys.platform == "darwin"
        else home / ".local" / "share"
    )
    return str(data / "quote-runs" / "quotes.sqlite3")


def settings_from_env(env: Mapping[str, str]) -> Settings:
    kv = _kv_credentials(env)
    secret_text = env.get("QUOTES_SECRET", "").strip()
    if secret_text:
        secret = secret_text.encode()
    elif kv:
        secret = hashlib.sha256(b"quote-runs idempotency\0" + kv.token.encode()).digest()
    else:
        # Local embedded store only: nothing to protect beyond this machine.
        secret = b"quote-runs local development secret"
    stream_max = _number(env, "STREAM_MAX_SECONDS", 0, minimum=1) or None
    run_max = _number(env, "RUN_MAX_SECONDS", 900, minimum=1)
    ttl = int(_number(env, "QUOTE_RUN_TTL_SECONDS", 7200, minimum=60))
    if ttl < run_max:
        # Keys get their TTL when a run starts and again when it ends: a run must fit in it.
        raise ConfigError(
            f"QUOTE_RUN_TTL_SECONDS ({ttl}) must be at least RUN_MAX_SECONDS ({run_max:g})"
        )
    runs_per_day = int(_number(env, "QUOTE_RUNS_PER_DAY", 200))
    api_keys = tuple(k.strip() for k in env.get("QUOTES_API_KEYS", "").split(",") if k.strip())
    origins = tuple(o.strip() for o in env.get("CORS_ALLOW_ORIGINS", "*").split(",") if o.strip())
    return Settings(
        kv=kv,
        db_path=env.get("QUOTES_DB_PATH", "").strip() or default_db_path(),
        run_ttl_seconds=ttl,
        tinyfish_api_key=env.get("TINYFISH_API_KEY", "").strip() or None,
        tinyfish_api_url=(
            env.get("TINYFISH_API_URL", "").strip() or DEFAULT_TINYFISH_API_URL
        ).rstrip("/"),
        providers=_providers(env.get("QUOTE_PROVIDERS", "")),
        provider_timeout_seconds=_number(env, "PROVIDER_TIMEOUT_SECONDS", 180, minimum=1),
        stream_max_seconds=stream_max,
        run_max_seconds=run_max,
        secret=secret,
        cors_allow_origins=origins or ("*",),
        run_lease_seconds=_number(env, "RUN_LEASE_SECONDS", 45, minimum=0.3),
        simulated_delay_scale=_number(env, "SIMULATED_DELAY_SCALE", 1.0),
        simulated_min_seconds=_number(env, "SIMULATED_MIN_SECONDS", 0),
        tinyfish_max_steps=_max_steps(env.get("TINYFISH_MAX_STEPS", "")),
        tinyfish_max_concurrency=_max_concurrency(env.get("TINYFISH_MAX_CONCURRENCY", "")),
        rate_limit_per_minute=int(_number(env, "QUOTE_RATE_LIMIT_PER_MINUTE", 30)),
        on_vercel_deployment=env.get("VERCEL") == "1"
        and env.get("VERCEL_ENV") in ("production", "preview"),
        on_vercel=env.get("VERCEL") == "1",
        queue_base_url=env.get("VERCEL_QUEUE_BASE_URL", "").strip().rstrip("/") or None,
        api_keys=api_keys,
        token_secret=secret_text.encode() if secret_text else None,
        quotes_public=_flag(env, "QUOTES_PUBLIC"),
        runs_per_day=runs_per_day,
        runs_per_day_total=int(_number(env, "QUOTE_RUNS_PER_DAY_TOTAL", runs_per_day)),
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return settings_from_env(os.environ)
