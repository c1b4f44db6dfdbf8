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
import threading
from typing import Any, Iterable, List, Optional, Tuple

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


def readline_within(stream, timeout: float) -> Optional[str]:
    """One line from ``stream`` (a child's stdout), or None when none came within ``timeout``
    seconds: a child stuck in CUDA initialisation must not hang the check. The reader thread
    stays blocked until the caller kills the child (a daemon thread, so it never holds up exit)."""
    got: List[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return got[0] if got else None


def figure(used_bytes: Optional[int]) -> str:
    """An NVML process figure in MiB; NVML gives none on MIG and some virtualised GPUs."""
    return "no figure" if used_bytes is None else f"{used_bytes / MIB:.0f} MiB"


def match_process(processes: Iterable[dict], pid: int, expect_bytes: int,
                  tolerance: int = GIB) -> Tuple[Optional[dict], str, str]:
    """Find a process of ours among NVML's (dicts with ``pid`` and ``used_bytes``).

    By PID first. NVML reports PIDs of the host's PID namespace; where this process runs in a
    namespace of its own (a gVisor sandbox, a container) its PIDs differ, so when ``pid`` is not
    listed, the one entry whose usage is within ``tolerance`` (about a CUDA context) of
    ``expect_bytes`` (what the process allocated) is taken. Returns (entry or None, how: "pid",
    "size" or "none", a note for the result's detail that names both PID lists)."""
    processes = list(processes)
    listed = ", ".join(f"{p['pid']}: {figure(p['used_bytes'])}" for p in processes) or "none"
    for p in processes:
        if p["pid"] == pid:
            return p, "pid", ""
    near = [p for p in processes
            if p["used_bytes"] is not None and abs(p["used_bytes"] - expect_bytes) <= tolerance]
    if len(near) == 1:
        return near[0], "size", (
            f"matched by size: our pid {pid} is not among NVML's PIDs ({listed}), so NVML shows another "
            f"PID namespace (the host's); pid {near[0]['pid']} is the one entry within "
            f"{tolerance / MIB:.0f} MiB of the {expect_bytes / MIB:.0f} MiB allocated")
    why = "no entry" if not near else f"{len(near)} entries (ambiguous)"
    return None, "none", (f"our pid {pid} is not among NVML's PIDs ({listed}), and {why} within "
                          f"{tolerance / MIB:.0f} MiB of the {expect_bytes / MIB:.0f} MiB allocated")


THROUGHPUT_TARGET_PERCENT = 1.0


def throughput_loss_ok(loss_percent: float, plain_spread_percent: float,
                       guarded_spread_percent: float = 0.0) -> bool:
    """The guard's throughput verdict: a loss within the target (1%), or no larger than the
    spread between two runs of the same side, which the measurement cannot tell from noise
    (clocks and power drift a few percent between runs of one matmul on these GPUs). Both
    sides' spreads are noise: the guard adds nothing inside a loop that reuses its blocks, so
    one side's pair agreeing by chance must not make the other's drift a FAIL."""
    noise = max(plain_spread_percent, guarded_spread_percent)
    return loss_percent <= max(THROUGHPUT_TARGET_PERCENT, noise)
