"""The queue's typed errors; routes map each to an HTTP status in one place (lib/http.py)."""

from __future__ import annotations


class QueueNotConfigured(Exception):
    """No queue to hand work to: not on Vercel and no local queue service configured."""


class QueueUnavailable(Exception):
    """The queue refused or could not take a message; retrying later can help."""
