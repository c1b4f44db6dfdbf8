"""Tests of the GPU check's result handling (run by `scripts/gpu-check.sh --dry-run`)."""

import json
import unittest

import checklib
import report


def rec(check, status, group="g"):
    return dict(checklib.result(check, status), group=group)


class ParseResults(unittest.TestCase):
    def test_reads_results_and_ignores_other_output(self):
        out = "\n".join([
            "some log line",
            "RESULT " + json.dumps(checklib.result("a", "PASS", figure="1 MiB")),
            "RESULT " + json.dumps(checklib.result("b", "NOT-RUN", detail="no torch")),
        ])
        records, problems = report.parse_results(out, "guard")
        self.assertEqual([r["check"] for r in records], ["a", "b"])
        self.assertEqual({r["group"] for r in records}, {"guard"})
        self.assertEqual(problems, [])

    def test_malformed_results_are_problems_not_crashes(self):
        out = "RESULT {not json\nRESULT {\"check\": \"x\", \"status\": \"MAYBE\"}\nRESULT []"
        records, problems = report.parse_results(out, "g")
        self.assertEqual(records, [])
        self.assertEqual(len(problems), 3)
        self.assertIn("line 1: not JSON", problems[0])

    def test_result_rejects_unknown_status(self):
        with self.assertRaises(ValueError):
            checklib.result("x", "OK")


class ProgramOutcome(unittest.TestCase):
    def test_timeout_exit_status_and_missing_checks_fail(self):
        records = [rec("present", "PASS")]
        out = report.program_outcome("g", "prog.py", records, ["line 3: bad"], 1, False,
                                     expected=["present", "absent"])
        checks = {r["check"]: r for r in out}
        self.assertEqual(checks["prog.py: exit status"]["figure"], "exit 1")
        self.assertIn("absent", checks)
        self.assertNotIn("present", checks)
        self.assertTrue(all(r["status"] == "FAIL" for r in out))
        timed = report.program_outcome("g", "prog.py", [], [], None, True)
        self.assertEqual(timed[0]["check"], "prog.py: finished in time")

    def test_clean_run_adds_nothing(self):
        self.assertEqual(report.program_outcome("g", "p", [rec("a", "PASS")], [], 0, False, ["a"]), [])


class Overall(unittest.TestCase):
    def test_verdicts(self):
        passed, failed, skipped = rec("a", "PASS"), rec("b", "FAIL"), rec("c", "NOT-RUN")
        self.assertEqual(report.overall([passed, skipped], dry_run=True), "PASS")
        self.assertEqual(report.overall([passed, skipped], dry_run=False), "FAIL")
        self.assertEqual(report.overall([passed, failed], dry_run=True), "FAIL")
        self.assertEqual(report.overall([skipped], dry_run=True), "FAIL")
        self.assertEqual(report.overall([], dry_run=True), "FAIL")
        self.assertEqual(report.overall([passed], dry_run=False), "PASS")


class Table(unittest.TestCase):
    def test_table_lists_every_check_and_explains_non_passes(self):
        records = [rec("mem_get_info shows the slice", "PASS"),
                   dict(rec("matmul throughput", "NOT-RUN"), detail="torch is not installed here")]
        text = report.render_table(records, "PASS")
        self.assertIn("mem_get_info shows the slice", text)
        self.assertIn("PASS: 1 passed, 0 failed, 1 not run", text)
        self.assertIn("NOT-RUN  matmul throughput: torch is not installed here", text)

    def test_long_cells_are_clipped(self):
        text = report.render_table([dict(rec("x" * 200, "PASS"), figure="y\n" * 50)], "PASS")
        self.assertTrue(all(len(line) < 200 for line in text.splitlines()))

    def test_document_counts(self):
        doc = report.document([rec("a", "PASS"), rec("b", "FAIL")], "FAIL", {"python": "3"}, True)
        self.assertEqual(doc["counts"], {"PASS": 1, "FAIL": 1, "NOT-RUN": 0})
        self.assertEqual(doc["schema"], "vramslice.io/gpu-check/v1")
        json.dumps(doc)


class Groups(unittest.TestCase):
    def test_only_picks_groups_in_run_order(self):
        self.assertEqual(report.parse_groups(None), list(report.GROUPS))
        self.assertEqual(report.parse_groups("infer, guard"), ["guard", "infer"])

    def test_unknown_or_empty_groups_are_named(self):
        with self.assertRaisesRegex(ValueError, "unknown group 'gaurd'.*plugin, guard, vllm, infer"):
            report.parse_groups("guard,gaurd")
        with self.assertRaisesRegex(ValueError, "unknown group"):
            report.parse_groups(",")

    def test_a_partial_run_says_so(self):
        records = [rec("a", "PASS", group="guard")]
        self.assertNotIn("partial", report.render_table(records, "PASS"))
        text = report.render_table(records, "PASS", ["guard"])
        self.assertIn("PASS: 1 passed, 0 failed, 0 not run (partial run: only guard;", text)
        doc = report.document(records, "PASS", {}, False, ["guard"])
        self.assertEqual((doc["groups"], doc["partial"]), (["guard"], True))
        self.assertFalse(report.document(records, "PASS", {}, False)["partial"])


if __name__ == "__main__":
    unittest.main()
