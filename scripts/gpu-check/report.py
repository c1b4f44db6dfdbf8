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
# The check's groups, in the order they run; ``--only`` picks some of them.
GROUPS = ("plugin", "guard", "vllm", "infer")


def parse_groups(text: Optional[str]) -> List[str]:
    """The groups ``--only`` names (comma-separated), in run order; all of them for None.
    Raises ValueError naming an unknown or missing group."""
    if text is None:
        return list(GROUPS)
    named = [part.strip() for part in text.split(",")]
    unknown = [name for name in named if name not in GROUPS]
    if unknown or not any(named):
        raise ValueError(f"unknown group {', '.join(repr(u) for u in unknown) or repr(text)}: "
                         f"choose from {', '.join(GROUPS)}")
    return [g for g in GROUPS if g in named]


def partial_note(groups: Iterable[str]) -> str:
    """How a run of only some groups is labelled (empty for a full run)."""
    groups = list(groups)
    if set(groups) >= set(GROUPS):
        return ""
    return f"partial run: only {', '.join(groups)}; the other groups did not run"


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


def render_table(records: List[dict], verdict: str, groups: Iterable[str] = GROUPS) -> str:
    """A fixed-width summary: group, check, figure, target, status; details below for anything
    that did not pass. A run of only some ``groups`` says so in its summary line."""
    cols = [("group", 8), ("check", 58), ("figure", 44), ("target", 26), ("status", 7)]
    lines = ["  ".join(name.ljust(w) for name, w in cols), "  ".join("-" * w for _, w in cols)]
    for r in records:
        lines.append("  ".join(_clip(r.get(name, ""), w).ljust(w) for name, w in cols).rstrip())
    c = counts(records)
    lines.append("")
    partial = partial_note(groups)
    lines.append(f"{verdict}: {c[PASS]} passed, {c[FAIL]} failed, {c[NOT_RUN]} not run"
                 + (f" ({partial})" if partial else ""))
    notes = [r for r in records if r["status"] != PASS and r.get("detail")]
    if notes:
        lines.append("")
        for r in notes:
            lines.append(f"{r['status']}  {r['check']}: {_clip(r['detail'], 400)}")
    return "\n".join(lines) + "\n"


def document(records: List[dict], verdict: str, environment: dict, dry_run: bool,
             groups: Iterable[str] = GROUPS) -> dict:
    """The JSON written to $OUT (``groups``: those that were selected to run)."""
    groups = list(groups)
    return {
        "schema": "vramslice.io/gpu-check/v1",
        "dry_run": dry_run,
        "groups": groups,
        "partial": bool(partial_note(groups)),
        "verdict": verdict,
        "counts": counts(records),
        "environment": environment,
        "results": records,
    }
