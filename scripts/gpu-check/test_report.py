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


class MatchProcess(unittest.TestCase):
    listed = [{"pid": 7001, "used_bytes": 3 * checklib.GIB}, {"pid": 7002, "used_bytes": 1536 * checklib.MIB}]

    def test_by_pid_first(self):
        entry, how, note = checklib.match_process(self.listed, 7001, checklib.GIB)
        self.assertEqual((entry["pid"], how, note), (7001, "pid", ""))

    def test_another_pid_namespace_matches_the_one_entry_of_that_size(self):
        entry, how, note = checklib.match_process(self.listed, 42, checklib.GIB)
        self.assertEqual((entry["pid"], how), (7002, "size"))
        self.assertIn("matched by size", note)
        self.assertIn("our pid 42", note)
        self.assertIn("7001: 3072 MiB", note)

    def test_no_match_or_an_ambiguous_one_names_both_pids(self):
        entry, how, note = checklib.match_process(self.listed, 42, 10 * checklib.GIB)
        self.assertEqual((entry, how), (None, "none"))
        self.assertIn("our pid 42", note)
        self.assertIn("7001", note)
        self.assertIn("7002", note)
        two = self.listed + [{"pid": 7003, "used_bytes": 1200 * checklib.MIB}]
        entry, how, note = checklib.match_process(two, 42, checklib.GIB)
        self.assertEqual((entry, how), (None, "none"))
        self.assertIn("ambiguous", note)
        self.assertEqual(checklib.match_process([], 42, checklib.GIB)[:2], (None, "none"))

    def test_a_process_nvml_gives_no_figure_for_is_named_and_never_matched_by_size(self):
        # NVML_VALUE_NOT_AVAILABLE (MIG, vGPU) reaches here as None: it must not crash the run.
        unknown = self.listed + [{"pid": 7004, "used_bytes": None}]
        entry, how, note = checklib.match_process(unknown, 42, 10 * checklib.GIB)
        self.assertEqual((entry, how), (None, "none"))
        self.assertIn("7004: no figure", note)
        entry, how, _ = checklib.match_process([{"pid": 7004, "used_bytes": None}], 42, 0)
        self.assertEqual((entry, how), (None, "none"))
        entry, how, _ = checklib.match_process(unknown, 7004, checklib.GIB)
        self.assertEqual((entry["pid"], how), (7004, "pid"))


class ThroughputVerdict(unittest.TestCase):
    def test_a_loss_passes_within_the_target_or_the_unguarded_runs_noise(self):
        self.assertTrue(checklib.throughput_loss_ok(0.8, 0.1))
        self.assertTrue(checklib.throughput_loss_ok(-2.0, 0.1))
        self.assertFalse(checklib.throughput_loss_ok(1.5, 0.4))
        self.assertTrue(checklib.throughput_loss_ok(1.5, 2.0), "no larger than plain vs plain")
        self.assertFalse(checklib.throughput_loss_ok(5.0, 2.0))
        self.assertTrue(checklib.throughput_loss_ok(1.5, 0.2, 1.8), "no larger than guarded vs guarded")
        self.assertFalse(checklib.throughput_loss_ok(2.5, 0.2, 1.8))


class UnwrappedEntryPoints(unittest.TestCase):
    def test_a_line_naming_an_unknown_entry_point_is_a_failure_of_its_group(self):
        import tempfile
        from pathlib import Path

        import gpucheck
        with tempfile.TemporaryDirectory() as tmp:
            run = gpucheck.Run(Path(tmp), Path(tmp), dry_run=True, budget_s=60)
            run.unwrapped_entry_points("guard", "fill", "cuda init\nall fine\n")
            self.assertEqual(run.records, [])
            line = ('vramslice-guard: cuGetProcAddress("cuMemAlloc", version 99000) '
                    + gpucheck.UNKNOWN_ENTRY_POINT + " (a newer ABI version?)")
            run.unwrapped_entry_points("guard", "fill", f"x\n{line}\n{line}\n")
            run.log.close()
            self.assertEqual([(r["group"], r["status"]) for r in run.records], [("guard", "FAIL")])
            self.assertIn('"cuMemAlloc", version 99000', run.records[0]["figure"])


class ReadlineWithin(unittest.TestCase):
    def test_a_line_or_none_at_the_deadline(self):
        import subprocess
        import sys
        quick = subprocess.Popen([sys.executable, "-c", "print('ready')"], stdout=subprocess.PIPE, text=True)
        self.assertEqual(checklib.readline_within(quick.stdout, 30), "ready\n")
        quick.wait()
        quick.stdout.close()
        stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], stdout=subprocess.PIPE,
                                 text=True)
        try:
            self.assertIsNone(checklib.readline_within(stuck.stdout, 0.3))
        finally:
            stuck.kill()
            stuck.wait()
            stuck.stdout.close()


if __name__ == "__main__":
    unittest.main()
