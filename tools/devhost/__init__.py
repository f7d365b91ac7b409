"""A local host for Vercel Python functions: `python -m tools.devhost` (what `make dev` runs).

Every ``api/**/*.py`` file is served by Vercel's own runtime (`vercel_runtime.dev`) in several
OS processes behind one streaming proxy that applies Vercel's filesystem routing and each
function's ``maxDuration``. End-to-end tests start it with `start_devhost_process`.
"""

from tools.devhost.process import DevHostError, RunningDevHost, start_devhost_process

__all__ = ["DevHostError", "RunningDevHost", "start_devhost_process"]
