"""One queue delivery's work: one provider of one run, or a run's deadline.

A provider delivery claims the provider's lease in the store, resumes its paid attempt where the
last delivery left it (the agent run id is stored the moment the agent API reports it, so a
resumed attempt reattaches instead of paying for a second agent run), relays activity, and writes
the outcome. Shortly before its own invocation's deadline it releases the lease and hands the
message back to the queue (`HandBack`), and the next delivery resumes. Every agent run the
system stops caring about is cancelled; one that finished is read back before its provider is
declared out of time. The queue SDK is not imported here: api/work.py maps `HandBack` to the
SDK's `RetryAfter`.

- `delivery`: what the queue said (`Delivery`) and what the worker answers (`HandBack`).
- `lease`: the provider's lease (claim, keep, release) and its agent slot.
- `journal`: the provider's writes, as the quote source's `AttemptListener`.
- `policy`: the retry policy, one value, and its pure `next_step`.
- `attempt`: one attempt, returning what it came to (`Quoted | Failed | HandOff | OutOfTime …`).
- `provider`: the delivery loop (`ProviderTask`) that acts on each of those.
- `endings`: how a delivery ends (quote, failure, hand-back), and the last look at a paid run.
- `deadline`: the run's own deadline (`enforce_deadline`).
- `clock`: the one clock, injected.
"""

from lib.worker.clock import SYSTEM_CLOCK, Clock
from lib.worker.deadline import enforce_deadline
from lib.worker.delivery import Delivery, HandBack, whole_seconds
from lib.worker.policy import RETRY_POLICY, RetryPolicy
from lib.worker.provider import ProviderTask

__all__ = [
    "RETRY_POLICY",
    "SYSTEM_CLOCK",
    "Clock",
    "Delivery",
    "HandBack",
    "ProviderTask",
    "RetryPolicy",
    "enforce_deadline",
    "whole_seconds",
]
