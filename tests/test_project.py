"""What Vercel's builder and a fresh clone rely on: dependency lists, entry points, settings."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from lib.config import ConfigError, default_db_path, settings_from_env
from tests.functions import FUNCTION_FILES, load_function

ROOT = Path(__file__).resolve().parent.parent


def test_requirements_txt_mirrors_the_runtime_dependencies_vercel_installs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert sorted(requirements) == sorted(pyproject["project"]["dependencies"])


def test_test_tools_are_not_runtime_dependencies() -> None:
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for tool in ("pytest", "respx", "ruff", "mypy", "uvicorn", "vercel-runtime", "redis"):
        assert not any(d.startswith(tool) for d in runtime), tool


def test_python_version_is_pinned_for_vercel_and_pyenv() -> None:
    assert (ROOT / ".python-version").read_text().strip() == "3.12"


@pytest.mark.parametrize("path", sorted(FUNCTION_FILES.values()))
def test_each_function_exports_an_asgi_app_and_has_a_max_duration(path: str) -> None:
    module = load_function(path)
    assert callable(module.app)
    functions = json.loads((ROOT / "vercel.json").read_text())["functions"]
    assert 10 <= functions[path]["maxDuration"] <= 300


def test_every_api_file_is_one_of_the_functions() -> None:
    found = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "api").rglob("*.py"))
    assert found == sorted(FUNCTION_FILES.values())


def test_settings_defaults_match_the_documented_configuration() -> None:
    settings = settings_from_env({})
    assert settings.kv is None
    assert settings.db_path == default_db_path()
    assert settings.run_ttl_seconds == 7200
    assert settings.providers == (
        "geico",
        "progressive",
        "state_farm",
        "allstate",
        "liberty_mutual",
    )
    assert settings.provider_timeout_seconds == 180
    assert settings.stream_max_seconds is None
    assert settings.run_max_seconds == 900
    assert settings.queue_backend is None
    assert settings.run_lease_seconds == 45
    assert settings.cors_allow_origins == ("*",)
    assert settings.tinyfish_api_key is None


def test_kv_credentials_come_from_either_naming() -> None:
    vercel = settings_from_env({"KV_REST_API_URL": "https://a/", "KV_REST_API_TOKEN": "tok-9f8e"})
    upstash = settings_from_env(
        {"UPSTASH_REDIS_REST_URL": "https://b", "UPSTASH_REDIS_REST_TOKEN": "u"}
    )
    assert vercel.kv is not None and vercel.kv.url == "https://a"
    assert upstash.kv is not None and upstash.kv.url == "https://b"
    assert "tok-9f8e" not in repr(vercel)  # tokens never show up in logs of the settings


def test_the_idempotency_secret_is_derived_from_the_kv_token_unless_set() -> None:
    one = settings_from_env({"KV_REST_API_URL": "u", "KV_REST_API_TOKEN": "token-1"})
    two = settings_from_env({"KV_REST_API_URL": "u", "KV_REST_API_TOKEN": "token-2"})
    explicit = settings_from_env({"QUOTES_SECRET": "s3cret", "KV_REST_API_TOKEN": "token-1"})
    assert one.secret != two.secret
    assert b"token-1" not in one.secret
    assert explicit.secret == b"s3cret"


def test_deployed_on_vercel_only_in_production_and_preview() -> None:
    for vercel_env, deployed in (("production", True), ("preview", True), ("development", False)):
        settings = settings_from_env({"VERCEL": "1", "VERCEL_ENV": vercel_env})
        assert settings.on_vercel_deployment is deployed


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QUOTE_PROVIDERS", "geico,acme"),
        ("PROVIDER_TIMEOUT_SECONDS", "soon"),
        ("RUN_LEASE_SECONDS", "-1"),
    ],
)
def test_unusable_configuration_is_a_clear_error(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        settings_from_env({name: value})


def test_make_bench_starts_every_module_it_needs() -> None:
    """`make bench` takes 19 minutes and no test runs it; its imports (the dev host's helpers
    among them) are checked here, so a change elsewhere cannot break it unnoticed."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "bench", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--only" in result.stdout
