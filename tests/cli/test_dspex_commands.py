"""The dspex program's operator commands, run as a user runs them (issue 12,
item 4): `dspex call` (its reply, --json, and an exit code per kind of
outcome), `dspex doctor` (findings, what to fix, --json), `dspex metrics`
(the exposition, read by prometheus_client's parser when it is installed),
and the LM key never shown by any of them.

    DSPEX=build/examples/dspex DSPEX_PYTHON=/usr/bin/python3 python3 -m unittest test_dspex_commands
"""

import json
import os
import subprocess
import tempfile
import unittest

DSPEX = os.environ["DSPEX"]
PYTHON = os.environ.get("DSPEX_PYTHON", "/usr/bin/python3")
TIMEOUT = 120  # a hang guard only


def dspex(*args, env=None):
    """Runs dspex with the test interpreter; returns (exit code, stdout, stderr)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    p = subprocess.run([DSPEX, *args, f"--worker.python={PYTHON}"], capture_output=True, text=True,
                       timeout=TIMEOUT, env=full_env)
    return p.returncode, p.stdout, p.stderr


class CallTests(unittest.TestCase):
    def test_a_reply_is_printed_as_json(self):
        rc, out, err = dspex("call", "ping")
        self.assertEqual(rc, 0, err)
        reply = json.loads(out)
        self.assertEqual(reply["status"], "ok")
        self.assertEqual(reply["lm"], "mock/mock")

    def test_json_gives_the_whole_outcome(self):
        rc, out, _ = dspex("call", "echo", '{"x": [1, 2]}', "--json", "--worker.test_commands")
        self.assertEqual(rc, 0)
        self.assertEqual(json.loads(out), {"ok": True, "result": {"x": [1, 2], "session_id": "anonymous"}})
        rc, out, _ = dspex("call", "no_such_command", "--json")
        self.assertEqual(rc, 1)
        failed = json.loads(out)
        self.assertFalse(failed["ok"])
        self.assertEqual(failed["error"]["category"], "python_error")

    def test_a_session_call(self):
        rc, out, err = dspex("call", "configure_lm", '{"provider": "mock", "model": "m2"}', "--session=s1")
        self.assertEqual(rc, 0, err)
        self.assertEqual(json.loads(out)["scope"], "session")

    def test_exit_codes_by_kind_of_outcome(self):
        with tempfile.TemporaryDirectory() as tmp:
            broken = os.path.join(tmp, "broken_worker.py")
            with open(broken, "w") as f:
                f.write("import sys\nsys.stderr.write('broken on purpose\\n')\nsys.exit(3)\n")
            cases = [
                (1, ["call", "no_such_command"]),                                    # python_error
                (2, ["call", "ping", "{not json"]),                                  # usage
                (2, ["call"]),                                                       # usage
                (2, ["call", "ping", "--pool.size=0"]),                              # configuration
                (3, ["call", "ping", f"--worker.script={broken}", "--pool.init_timeout=5s",
                     "--pool.broken_after=1"]),                                      # could not start
                (4, ["call", "sleep", '{"ms": 5000}', "--worker.test_commands",
                     "--pool.request_timeout=300ms", "--retry.max_attempts=1"]),     # timeout
                (5, ["call", "crash", "--worker.test_commands", "--retry.max_attempts=1"]),  # worker lost
                (7, ["call", ""]),                                                   # system_error (invalid_request)
            ]
            for expected, args in cases:
                with self.subTest(args=args):
                    rc, out, err = dspex(*args)
                    self.assertEqual(rc, expected, f"stdout={out!r} stderr={err[-400:]!r}")
                    if expected not in (0, 2):
                        self.assertIn("dspex call:", err)

    def test_the_lm_key_is_never_shown(self):
        key = "sk-PLANTED-cli-5e7d"
        rc, out, err = dspex("call", "get_stats", "--lm.api_key_env=DSPEX_TEST_CLI_KEY", "--log.level=debug",
                             env={"DSPEX_TEST_CLI_KEY": key})
        self.assertEqual(rc, 0, err)
        self.assertTrue(json.loads(out)["lm_has_key"])
        self.assertNotIn(key, out)
        self.assertNotIn(key, err)


class TopologyTests(unittest.TestCase):
    """Issue 13: a topology file's pools, used by `call --pool` and `run --topology`."""

    TOPOLOGY = os.path.join(os.path.dirname(__file__), "..", "..", "config", "topologies", "two_pools.ini")

    def test_call_runs_on_the_named_pool(self):
        rc, out, err = dspex("call", "configure_lm", '{"provider": "mock", "model": "x"}', "--pool=qa",
                             "--session=s1", f"--config-file={self.TOPOLOGY}", "--json")
        self.assertEqual(rc, 0, err)
        self.assertTrue(json.loads(out)["ok"])
        rc, out, err = dspex("call", "ping", "--pool=nope", f"--config-file={self.TOPOLOGY}", "--json")
        self.assertEqual(rc, 7, err)  # invalid_request: "any other error"
        self.assertEqual(json.loads(out)["error"]["context"]["reason"], "unknown_pool")

    def test_run_spreads_the_sessions_over_every_pool(self):
        rc, out, err = dspex("run", "--requests=40", "--concurrency=4", "--json", f"--topology={self.TOPOLOGY}")
        self.assertEqual(rc, 0, err[-2000:])
        summary = json.loads(out)
        self.assertEqual(summary["failed"], 0)
        self.assertEqual(sorted(summary["pools"]), ["default", "qa"])
        self.assertEqual(summary["pools"]["qa"]["size"], 3)
        for name, pool in summary["pools"].items():
            self.assertGreater(pool["succeeded"], 0, name)
        self.assertEqual(sum(p["succeeded"] for p in summary["pools"].values()), summary["succeeded"])
        rc, _, err = dspex("run", f"--topology={self.TOPOLOGY}", f"--config-file={self.TOPOLOGY}")
        self.assertEqual(rc, 2)
        self.assertIn("not both", err)


class DoctorTests(unittest.TestCase):
    def test_a_working_setup_is_ready(self):
        rc, out, err = dspex("doctor")
        self.assertEqual(rc, 0, out + err)
        self.assertIn("doctor: ready", out)
        for name in ("interpreter", "worker script", "dspy", "LM key", "file limit", "worker start"):
            self.assertIn(name, out)
        rc, out, _ = dspex("doctor", "--json")
        report = json.loads(out)
        self.assertTrue(report["ok"])
        self.assertEqual({c["name"] for c in report["checks"]},
                         {"interpreter", "worker script", "dspy", "LM key", "file limit", "worker start"})

    def test_what_is_broken_is_named_with_its_fix(self):
        with tempfile.TemporaryDirectory() as tmp:
            broken = os.path.join(tmp, "broken_worker.py")
            with open(broken, "w") as f:
                f.write("import sys\nsys.stderr.write('broken on purpose\\n')\nsys.exit(3)\n")
            rc, out, _ = dspex("doctor", "--json", f"--worker.script={broken}", "--pool.broken_after=1")
            self.assertEqual(rc, 1)
            checks = {c["name"]: c for c in json.loads(out)["checks"]}
            self.assertEqual(checks["worker start"]["status"], "fail")
            self.assertIn("broken on purpose", checks["worker start"]["detail"])
            self.assertTrue(checks["worker start"]["fix"])
        # A key variable that is not set: the configuration is the finding.
        rc, out, _ = dspex("doctor", "--lm.api_key_env=DSPEX_TEST_UNSET_KEY")
        self.assertEqual(rc, 1)
        self.assertIn("fail  configuration", out)
        self.assertIn("fix: correct lm.api_key_env", out)
        key = "sk-PLANTED-doctor-1a2b"
        rc, out, err = dspex("doctor", "--lm.api_key_env=DSPEX_TEST_DOCTOR_KEY", env={"DSPEX_TEST_DOCTOR_KEY": key})
        self.assertEqual(rc, 0, out + err)
        self.assertIn("DSPEX_TEST_DOCTOR_KEY is set", out)
        self.assertNotIn(key, out + err)


class MetricsTests(unittest.TestCase):
    def test_the_exposition_parses_and_counts_the_calls(self):
        rc, out, err = dspex("metrics", "--requests=5", "--pool.size=2")
        self.assertEqual(rc, 0, err)
        self.assertTrue(out.endswith("\n"))
        self.assertIn('dspex_calls_total{pool="default",command="ping",outcome="ok"} 5\n', out)
        self.assertIn('dspex_call_duration_seconds_count{pool="default"} 5\n', out)
        try:
            from prometheus_client.parser import text_string_to_metric_families
        except ImportError:
            self.skipTest("python3-prometheus-client is not installed (scripts/packages.sh installs it)")
        families = {f.name: f for f in text_string_to_metric_families(out)}
        # prometheus_client names counters without _total.
        self.assertEqual(families["dspex_calls"].type, "counter")
        self.assertEqual(families["dspex_call_duration_seconds"].type, "histogram")
        self.assertEqual(families["dspex_pool_workers"].type, "gauge")
        buckets = [s for s in families["dspex_call_duration_seconds"].samples if s.name.endswith("_bucket")]
        self.assertEqual(buckets[-1].labels["le"], "+Inf")
        self.assertEqual(buckets[-1].value, 5)


class RunTests(unittest.TestCase):
    def test_json_summary_and_no_progress_in_a_pipe(self):
        rc, out, err = dspex("run", "--requests=30", "--json", "--pool.size=2")
        self.assertEqual(rc, 0, err[-2000:])
        summary = json.loads(out)
        self.assertEqual(summary["failed"], 0)
        self.assertEqual(summary["succeeded"], summary["requests"])
        self.assertEqual(summary["sessions"]["programs_lost"], 0)
        self.assertEqual(summary["pool"]["size"], 2)
        self.assertNotIn("progress:", err)  # stderr is a pipe here


class BenchTests(unittest.TestCase):
    def test_a_quick_run_prints_every_ratio_from_its_own_figures(self):
        # A smoke run: that the command runs and reports, never its figures.
        p = subprocess.run([DSPEX, "bench", "--quick", f"--python={PYTHON}"], capture_output=True, text=True,
                           timeout=600)
        self.assertEqual(p.returncode, 0, p.stderr[-2000:])
        self.assertIn("ratios (every figure from this run)", p.stdout)
        self.assertIn("pool sequential p50 / raw p50", p.stdout)
        self.assertIn("raw pipe, 1 worker, sequential", p.stdout)
        # Not a terminal: no progress bar in the output.
        self.assertNotIn("\r[", p.stderr)
        rc = subprocess.run([DSPEX, "bench", "--no-such-option"], capture_output=True, text=True, timeout=60)
        self.assertEqual(rc.returncode, 2)


if __name__ == "__main__":
    unittest.main()
