"""What every check program of the GPU check shares: how it reports a result.

A check program is run by ``gpucheck.py`` as a child process (so a crash, a hang or a CUDA
error in one cannot take the others down) and reports each result as one stdout line
``RESULT {json}``; everything else it prints is kept as its log. A result names the check, a
status (PASS, FAIL or NOT-RUN), the figure measured, the target it was held to, and free-form
detail. Only the standard library is used here: this file is imported by programs that run
with and without PyTorch.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

PASS, FAIL, NOT_RUN = "PASS", "FAIL", "NOT-RUN"
STATUSES = (PASS, FAIL, NOT_RUN)
GIB = 1 << 30
MIB = 1 << 20


def result(
    check: str,
    status: str,
    figure: str = "",
    target: str = "",
    detail: str = "",
    **values: Any,
) -> dict:
    """Build one result record (``values`` are extra numbers kept in the JSON)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    record = {"check": check, "status": status, "figure": figure, "target": target, "detail": detail}
    if values:
        record["values"] = values
    return record


def emit(check: str, ok: bool, figure: str = "", target: str = "", detail: str = "", **values: Any) -> bool:
    """Report a check that ran: PASS when ``ok``; returns ``ok``."""
    record = result(check, PASS if ok else FAIL, figure, target, detail, **values)
    print("RESULT " + json.dumps(record, default=str), flush=True)
    return ok


def not_run(check: str, why: str, target: str = "") -> None:
    """Report a check that could not run here, and why."""
    print("RESULT " + json.dumps(result(check, NOT_RUN, target=target, detail=why)), flush=True)


def env_int(name: str, default: Optional[int] = None) -> int:
    """An integer from the environment; a clear error when it is missing or not a number."""
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            sys.exit(f"{name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        sys.exit(f"{name}={raw!r} is not an integer")


def mib(n: float) -> str:
    """Bytes as MiB, for figures."""
    return f"{n / MIB:.0f} MiB"


def child_env(guarded: bool) -> dict:
    """This process's environment without the guard, or with the guard's environment
    (GPUCHECK_GUARD_ENV, JSON) added: for programs that compare plain and guarded children."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMSLICE_") and k != "LD_PRELOAD"}
    if guarded:
        raw = os.environ.get("GPUCHECK_GUARD_ENV")
        if not raw:
            sys.exit("GPUCHECK_GUARD_ENV is not set")
        env.update(json.loads(raw))
    return env
