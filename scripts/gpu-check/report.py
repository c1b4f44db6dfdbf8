"""The GPU check's results: collected from the check programs, written as JSON and as a table.

Pure functions over plain dicts (see ``checklib.result``) so ``test_report.py`` can check them
without a GPU. ``parse_results`` reads a check program's stdout, ``overall`` decides the exit
status, ``render_table`` and ``document`` produce what lands in $OUT.
"""

from __future__ import annotations

import json
from typing import Iterable, List, Optional, Tuple

from checklib import FAIL, NOT_RUN, PASS, STATUSES, result

RESULT_PREFIX = "RESULT "


def parse_results(stdout: str, group: str) -> Tuple[List[dict], List[str]]:
    """The result records in a check program's stdout (tagged with ``group``), and complaints
    about lines that start like a result but are not one."""
    records, problems = [], []
    for n, line in enumerate(stdout.splitlines(), 1):
        if not line.startswith(RESULT_PREFIX):
            continue
        try:
            record = json.loads(line[len(RESULT_PREFIX):])
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not JSON: {e}")
            continue
        if not isinstance(record, dict) or record.get("status") not in STATUSES or not record.get("check"):
            problems.append(f"line {n}: not a result record: {line[:120]}")
            continue
        record = dict(record, group=group)
        records.append(record)
    return records, problems


def program_outcome(group: str, program: str, records: List[dict], problems: List[str],
                    returncode: Optional[int], timed_out: bool, expected: Iterable[str] = ()) -> List[dict]:
    """Results that describe how a check program itself ended: a FAIL when it timed out, exited
    non-zero, printed malformed results, or left out a check it must report."""
    out = []
    if timed_out:
        out.append(result(f"{program}: finished in time", FAIL, detail="killed at its timeout"))
    elif returncode not in (0, None):
        out.append(result(f"{program}: exit status", FAIL, figure=f"exit {returncode}",
                          detail="see the log for its output"))
    for p in problems:
        out.append(result(f"{program}: output", FAIL, detail=p))
    seen = {r["check"] for r in records}
    for name in expected:
        if name not in seen:
            out.append(result(name, FAIL, detail=f"{program} did not report it"))
    return [dict(r, group=group) for r in out]


def overall(records: List[dict], dry_run: bool) -> str:
    """PASS when nothing failed and something passed. NOT-RUN counts as a failure on a real run
    (everything must run where a GPU is) and is expected in a dry run."""
    if not records:
        return FAIL
    if any(r["status"] == FAIL for r in records):
        return FAIL
    if not dry_run and any(r["status"] == NOT_RUN for r in records):
        return FAIL
    if not any(r["status"] == PASS for r in records):
        return FAIL
    return PASS


def counts(records: List[dict]) -> dict:
    """How many results have each status."""
    return {s: sum(1 for r in records if r["status"] == s) for s in STATUSES}


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(records: List[dict], verdict: str) -> str:
    """A fixed-width summary: group, check, figure, target, status; details below for anything
    that did not pass."""
    cols = [("group", 8), ("check", 58), ("figure", 44), ("target", 26), ("status", 7)]
    lines = ["  ".join(name.ljust(w) for name, w in cols), "  ".join("-" * w for _, w in cols)]
    for r in records:
        lines.append("  ".join(_clip(r.get(name, ""), w).ljust(w) for name, w in cols).rstrip())
    c = counts(records)
    lines.append("")
    lines.append(f"{verdict}: {c[PASS]} passed, {c[FAIL]} failed, {c[NOT_RUN]} not run")
    notes = [r for r in records if r["status"] != PASS and r.get("detail")]
    if notes:
        lines.append("")
        for r in notes:
            lines.append(f"{r['status']}  {r['check']}: {_clip(r['detail'], 400)}")
    return "\n".join(lines) + "\n"


def document(records: List[dict], verdict: str, environment: dict, dry_run: bool) -> dict:
    """The JSON written to $OUT."""
    return {
        "schema": "vramslice.io/gpu-check/v1",
        "dry_run": dry_run,
        "verdict": verdict,
        "counts": counts(records),
        "environment": environment,
        "results": records,
    }
