"""The run's lines: one per provider outcome, at a level that means something, and one summary
when the run ends, with what became of each provider."""

from __future__ import annotations

from datetime import timedelta

import pytest

from lib.logs import log_context
from lib.models import ErrorInfo, ProviderLease, ProviderState, ProviderWork, utc_now
from lib.run_log import log_provider_outcome, log_run_summary
from tests.conftest import make_quote, make_record


@pytest.mark.parametrize(
    ("outcome", "level"),
    [("quoted", "info"), ("provider_declined", "warning"), ("provider_auth", "error")],
)
def test_a_provider_outcome_is_one_line_at_a_level_that_means_something(
    json_logs, outcome, level
) -> None:
    started = utc_now()
    work = ProviderWork(
        attempt=2,
        first_started_at=started,
        agent_run_ids=["a1", "a2"],
        agent_steps={"a1": 3, "a2": 11},
    )
    with log_context(runId="r1", provider="geico"):
        log_provider_outcome("geico", outcome, work, finished_at=started + timedelta(seconds=12.5))
    (line,) = json_logs.matching(kind="provider_outcome")
    assert line["level"] == level
    assert line["runId"] == "r1" and line["provider"] == "geico"
    assert line["outcome"] == outcome
    assert line["attempts"] == 2
    assert line["agentRunIds"] == ["a1", "a2"]
    assert line["agentSteps"] == 14
    assert line["seconds"] == 12.5


def ended_record(status: str, error: ErrorInfo | None = None):  # type: ignore[no-untyped-def]
    now = utc_now()
    started = now - timedelta(seconds=40)
    record = make_record(created_at=now - timedelta(seconds=41), ended_at=now, status=status)
    record = record.model_copy(
        update={
            "error": error,
            "providers": [
                ProviderState(provider="geico", status="quoted", quote=make_quote("geico")),
                ProviderState(
                    provider="allstate",
                    status="failed",
                    error=ErrorInfo(code="provider_declined", message="no quote online"),
                ),
                ProviderState(
                    provider="progressive",
                    status="failed",
                    error=error or ErrorInfo(code="provider_auth", message="out of credit"),
                ),
            ],
            "work": {
                "geico": ProviderWork(
                    attempt=1,
                    first_started_at=started,
                    agent_run_ids=["g1"],
                    agent_steps={"g1": 9},  # as far as the last save saw: the outcome says 12
                ),
                "allstate": ProviderWork(
                    attempt=3,
                    first_started_at=started,
                    agent_run_ids=["s1", "s2", "s3"],
                    cancelled_agent_run_ids=["s1", "s2"],
                    agent_steps={"s1": 4, "s2": 3, "s3": 6},
                ),
            },
            "leases": {
                "geico": ProviderLease(owner="w", until=now, deliveries=2),
                "allstate": ProviderLease(owner="w", until=now, deliveries=1),
            },
            "finished_at": {
                "geico": started + timedelta(seconds=20),
                "allstate": started + timedelta(seconds=30),
            },
            "agent_steps": {"geico": 12, "allstate": 13},
        }
    )
    return record


def test_a_completed_runs_summary_says_what_became_of_each_provider(json_logs) -> None:
    record = ended_record("completed")
    with log_context(runId=record.run_id, provider="allstate"):
        log_run_summary(record)
    (line,) = json_logs.matching(kind="run_summary")
    assert line["level"] == "info"
    assert line["runId"] == record.run_id
    assert "provider" not in line, "the summary is the run's, not the last provider's"
    assert line["outcome"] == "completed" and "errorCode" not in line
    assert line["seconds"] == 41.0
    assert (line["quoted"], line["notQuoted"]) == (1, 2)
    assert line["providers"] == {
        "geico": {
            "outcome": "quoted",
            "attempts": 1,
            "agentRunIds": ["g1"],
            "agentSteps": 12,
            "deliveries": 2,
            "seconds": 20.0,
        },
        "allstate": {
            "outcome": "provider_declined",
            "attempts": 3,
            "agentRunIds": ["s1", "s2", "s3"],
            "cancelledAgentRunIds": ["s1", "s2"],
            "agentSteps": 13,
            "deliveries": 1,
            "seconds": 30.0,
        },
        # Never started: no attempts, no deliveries, and no time is invented for it.
        "progressive": {
            "outcome": "provider_auth",
            "attempts": 0,
            "agentRunIds": [],
            "deliveries": 0,
        },
    }


def test_a_run_that_fails_as_a_whole_is_an_error_line_with_its_code(json_logs) -> None:
    error = ErrorInfo(code="deadline_exceeded", message="did not finish in time")
    log_run_summary(ended_record("failed", error))
    (line,) = json_logs.matching(kind="run_summary")
    assert line["level"] == "error"
    assert line["outcome"] == "failed" and line["errorCode"] == "deadline_exceeded"
    assert line["message"].startswith("run failed (deadline_exceeded) in 41.0 s")
    assert line["providers"]["progressive"]["outcome"] == "deadline_exceeded"
