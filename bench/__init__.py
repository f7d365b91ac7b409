"""`make bench`: this project's storage design measured beside the seed's, in one run.

Everything runs on loopback in separate OS processes, as in production each is on its own machine:

- a real redis-server (127.0.0.1:6379, or TEST_REDIS_URL) behind the tests' Upstash REST endpoint
  (`python -m tests.upstash_rest`), which counts every request, command and byte it serves;
- the stream function `api/quotes/[runId]/stream.py`, hosted by Vercel's Python runtime
  (`vercel_runtime.dev`) with the same launcher `make dev` uses (`tools/devhost/supervisor.py`);
- this process: the worker that appends events, the SSE clients, and the seed design
  (`bench/seed.py`), which needs no function of its own.

Modules: `infra` (processes, machine facts), `seed` (the baseline), `scenarios` (what is measured),
`report` (the table).
"""
