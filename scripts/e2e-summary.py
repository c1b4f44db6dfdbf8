#!/usr/bin/env python3
"""Print `go test -json` output as the usual -v text, then, for every failed test, the lines it
printed just before failing (before its component logs were dumped), so the reason for a
failure is at the end of the run, where CI output tails show it.

    go test -json ./... | python3 scripts/e2e-summary.py
"""
import json
import sys

DUMP_START = "logs kept in e2e/.work/logs"
KEEP = 15


def main() -> int:
    outputs: dict[str, list[str]] = {}
    failed: list[str] = []
    for raw in sys.stdin:
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            sys.stdout.write(raw)  # not test2json (a build error, say): pass it on
            continue
        test = event.get("Test")
        action = event.get("Action")
        if action == "build-output":  # compiler messages (Go >= 1.24 reports them as events)
            text = event.get("Output", "")
            sys.stdout.write(text)
            outputs.setdefault("build " + event.get("ImportPath", "?"), []).append(text.rstrip("\n"))
        elif action == "build-fail":
            failed.append("build " + event.get("ImportPath", "?"))
        elif action == "output":
            text = event.get("Output", "")
            sys.stdout.write(text)
            if test:
                outputs.setdefault(test, []).append(text.rstrip("\n"))
        elif action == "fail" and test:
            failed.append(test)
        sys.stdout.flush()
    if failed:
        print("\n==> e2e failures (the lines each failed test printed before failing):")
        for test in failed:
            lines = outputs.get(test, [])
            cut = next((i for i, l in enumerate(lines) if DUMP_START in l), len(lines))
            before = [l for l in lines[:cut] if l.strip() and not l.startswith("=== ")]
            print(f"--- {test}")
            for line in before[-KEEP:]:
                print(f"    {line.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
