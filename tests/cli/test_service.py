"""The example service (issue 12, item 2) with real HTTP requests: success,
each error class with its status from the one table, a malformed body, a
worker killed mid-request, and SIGTERM while calls are in flight (they are
answered, the process exits 0, no worker is left).

    DSPEX=build/examples/dspex DSPEX_PYTHON=/usr/bin/python3 python3 -m unittest test_service
"""

import http.client
import json
import os
import signal
import subprocess
import threading
import time
import unittest

DSPEX = os.environ["DSPEX"]
PYTHON = os.environ.get("DSPEX_PYTHON", "/usr/bin/python3")
HANG_GUARD = 60  # seconds: a bound on every wait, never a timing assertion


def alive(pid):
    """True while /proc shows the process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class Service:
    def __init__(self, *settings):
        self.proc = subprocess.Popen([DSPEX, "serve", "--port=0", f"--worker.python={PYTHON}",
                                      "--worker.test_commands", "--log.level=warn", *settings],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(HANG_GUARD)
        if not line or "listening on" not in line[0]:
            self.proc.kill()
            raise RuntimeError(f"the service did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.port = int(line[0].strip().rsplit(":", 1)[1])

    def request(self, method, path, body=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HANG_GUARD)
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode("utf-8")
        conn.close()
        return resp.status, text

    def json(self, method, path, body=None, raw=None):
        status, text = self.request(method, path, body, raw)
        return status, json.loads(text)

    def status(self):
        code, reply = self.json("GET", "/v1/status")
        assert code == 200, reply
        return reply["result"]

    def wait_status(self, pred):
        deadline = time.monotonic() + HANG_GUARD
        while time.monotonic() < deadline:
            st = self.status()
            if pred(st):
                return st
            time.sleep(0.01)
        raise AssertionError("the status never got there")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(HANG_GUARD)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stdout.close()
            self.proc.stderr.close()


class ServiceTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.svc = Service("--pool.size=2", "--session.max_sessions=2")

    @classmethod
    def tearDownClass(cls):
        pids = [w["pid"] for w in cls.svc.status()["workers"]]
        code = cls.svc.stop()
        assert code == 0, code
        for pid in pids:
            assert not alive(pid), f"worker {pid} left behind"

    def test_success(self):
        code, reply = self.svc.json("POST", "/v1/execute", {"command": "ping"})
        self.assertEqual(code, 200)
        self.assertTrue(reply["ok"])
        self.assertEqual(reply["result"]["status"], "ok")

    def test_each_error_class_has_its_status(self):
        cases = [
            (422, "python_error", {"command": "no_such_command"}),
            (400, "system_error", {"command": ""}),                                   # invalid_request
            (400, "system_error", {"command": "ping", "args": [1, 2]}),               # args not an object
            (504, "timeout_error", {"command": "sleep", "args": {"ms": 5000}, "timeout_ms": 300}),
        ]
        for status, category, body in cases:
            with self.subTest(body=body):
                code, reply = self.svc.json("POST", "/v1/execute", body)
                self.assertEqual(code, status, reply)
                self.assertFalse(reply["ok"])
                self.assertEqual(reply["error"]["category"], category)

    def test_a_malformed_body_and_unknown_paths(self):
        for raw in ("{not json", "[1,2]", '{"args": {}}', '{"command": "ping", "timeout_ms": -5}'):
            with self.subTest(raw=raw):
                code, reply = self.svc.json("POST", "/v1/execute", raw=raw)
                self.assertEqual(code, 400)
                self.assertEqual(reply["error"]["type"], "invalid_request")
                self.assertEqual(reply["error"]["context"]["reason"], "malformed_body")
        code, reply = self.svc.json("GET", "/v1/nothing")
        self.assertEqual(code, 404)
        code, _ = self.svc.json("GET", "/v1/execute")
        self.assertEqual(code, 405)

    def test_sessions(self):
        code, reply = self.svc.json("POST", "/v1/sessions/s1/execute",
                                    {"command": "configure_lm", "args": {"provider": "mock", "model": "m2"}})
        self.assertEqual(code, 200, reply)
        self.assertEqual(reply["result"]["scope"], "session")
        code, reply = self.svc.json("POST", "/v1/sessions/s1/execute", {"command": "ping"})
        self.assertEqual(code, 200, reply)
        # session.max_sessions=2: a third live session is refused (409).
        self.assertEqual(self.svc.json("POST", "/v1/sessions/s2/execute", {"command": "ping"})[0], 200)
        code, reply = self.svc.json("POST", "/v1/sessions/s3/execute", {"command": "ping"})
        self.assertEqual(code, 409, reply)
        self.assertEqual(reply["error"]["category"], "session_error")
        for sid in ("s1", "s2"):
            code, reply = self.svc.json("DELETE", f"/v1/sessions/{sid}")
            self.assertEqual(code, 200, reply)
        code, reply = self.svc.json("DELETE", "/v1/sessions/s1")
        self.assertEqual(code, 404, reply)
        self.assertEqual(reply["error"]["type"], "session_not_found")

    def test_status_health_and_metrics(self):
        self.assertEqual(self.svc.json("GET", "/healthz"),
                         (200, {"ok": True, "health": "healthy", "pools": {"default": "healthy"}}))
        st = self.svc.status()
        self.assertEqual(st["size"], 2)
        code, text = self.svc.request("GET", "/metrics")
        self.assertEqual(code, 200)
        self.assertIn('dspex_pool_size{pool="default"} 2\n', text)
        try:
            from prometheus_client.parser import text_string_to_metric_families
        except ImportError:
            self.skipTest("python3-prometheus-client is not installed")
        names = {f.name for f in text_string_to_metric_families(text)}
        self.assertIn("dspex_calls", names)

    def test_a_worker_killed_mid_request_is_a_502(self):
        result = {}

        def call():
            result["reply"] = self.svc.json("POST", "/v1/execute",
                                            {"command": "sleep", "args": {"ms": 20000}, "timeout_ms": 40000})

        t = threading.Thread(target=call)
        t.start()
        st = self.svc.wait_status(lambda s: any(w["state"] == "busy" and w["pid"] for w in s["workers"]))
        pid = next(w["pid"] for w in st["workers"] if w["state"] == "busy")
        os.kill(pid, signal.SIGKILL)
        t.join(HANG_GUARD)
        code, reply = result["reply"]
        self.assertEqual(code, 502, reply)
        self.assertEqual(reply["error"]["category"], "communication_error")
        self.assertEqual(reply["error"]["type"], "worker_exited")
        self.svc.wait_status(lambda s: s["idle"] == 2)


class SaturationTests(unittest.TestCase):
    def test_a_full_queue_is_a_429(self):
        # One worker, one place in line: a running call, a waiting one, and the third is refused.
        svc = Service("--pool.size=1", "--pool.max_queue=1")
        results = []
        lock = threading.Lock()

        def sleeper():
            r = svc.json("POST", "/v1/execute", {"command": "sleep", "args": {"ms": 1500}, "timeout_ms": 30000})
            with lock:
                results.append(r[0])

        threads = [threading.Thread(target=sleeper) for _ in range(2)]
        try:
            threads[0].start()
            svc.wait_status(lambda s: s["busy"] == 1)
            threads[1].start()
            svc.wait_status(lambda s: s["queued"] == 1)
            code, reply = svc.json("POST", "/v1/execute", {"command": "ping"})
            self.assertEqual(code, 429, reply)
            self.assertEqual(reply["error"]["type"], "pool_saturated")
        finally:
            for t in threads:
                if t.is_alive() or t.ident:
                    t.join(HANG_GUARD)
            svc.stop()
        self.assertEqual(results, [200, 200])


class NamedPoolTests(unittest.TestCase):
    """Issue 13: a service over two pools; the body's or the query's "pool" names one."""

    def test_calls_status_sessions_and_metrics_by_pool(self):
        svc = Service("--pool.size=1", "--pools.qa.pool.size=2")
        try:
            self.assertEqual(svc.json("GET", "/v1/pools"), (200, {"ok": True, "result": {"pools": ["default", "qa"]}}))
            code, reply = svc.json("POST", "/v1/execute", {"command": "ping", "pool": "qa"})
            self.assertEqual(code, 200, reply)
            code, reply = svc.json("POST", "/v1/execute?pool=qa", {"command": "ping"})
            self.assertEqual(code, 200, reply)
            code, reply = svc.json("POST", "/v1/execute", {"command": "ping"})
            self.assertEqual(code, 200, reply)
            qa = svc.json("GET", "/v1/status?pool=qa")[1]["result"]
            self.assertEqual((qa["pool"], qa["size"], qa["metrics"]["total"]["count"]), ("qa", 2, 2))
            self.assertTrue(all(w["id"].startswith("qa.w") for w in qa["workers"]))
            default = svc.status()
            self.assertEqual((default["pool"], default["size"], default["metrics"]["total"]["count"]), ("default", 1, 1))
            self.assertEqual(svc.json("GET", "/v1/status?pool=nope")[0], 404)
            # An unknown pool is the caller's mistake, answered with the table's status for it.
            code, reply = svc.json("POST", "/v1/execute", {"command": "ping", "pool": "nope"})
            self.assertEqual(code, 400, reply)
            self.assertEqual(reply["error"]["context"]["reason"], "unknown_pool")
            self.assertEqual(svc.json("POST", "/v1/execute", {"command": "ping", "pool": 3})[0], 400)
            # The session s1 of qa is not the session s1 of default.
            code, reply = svc.json("POST", "/v1/sessions/s1/execute?pool=qa", {"command": "ping"})
            self.assertEqual(code, 200, reply)
            self.assertEqual(svc.json("DELETE", "/v1/sessions/s1")[0], 404)
            self.assertEqual(svc.json("DELETE", "/v1/sessions/s1?pool=qa")[0], 200)
            self.assertEqual(svc.json("GET", "/healthz"),
                             (200, {"ok": True, "health": "healthy", "pools": {"default": "healthy", "qa": "healthy"}}))
            code, text = svc.request("GET", "/metrics")
            self.assertEqual(code, 200)
            self.assertIn('dspex_pool_size{pool="default"} 1\n', text)
            self.assertIn('dspex_pool_size{pool="qa"} 2\n', text)
            self.assertEqual(text.count("# TYPE dspex_pool_size gauge"), 1)
        finally:
            self.assertEqual(svc.stop(), 0)


class CircuitTests(unittest.TestCase):
    def test_an_open_circuit_is_a_503(self):
        # One failure that says the pool is in trouble opens the circuit: the next call is refused.
        svc = Service("--pool.size=1", "--circuit.failure_threshold=1", "--circuit.open_timeout=60s",
                      "--retry.max_attempts=1")
        try:
            code, reply = svc.json("POST", "/v1/execute", {"command": "crash"})
            self.assertEqual(code, 502, reply)
            code, reply = svc.json("POST", "/v1/execute", {"command": "ping"})
            self.assertEqual(code, 503, reply)
            self.assertEqual(reply["error"]["category"], "resource_error")
            self.assertEqual(reply["error"]["type"], "circuit_open")
        finally:
            self.assertEqual(svc.stop(), 0)


class DrainTests(unittest.TestCase):
    def test_sigterm_finishes_the_calls_in_flight_and_leaves_no_worker(self):
        svc = Service("--pool.size=3")
        pids = [w["pid"] for w in svc.status()["workers"]]
        replies = []
        lock = threading.Lock()

        def call():
            r = svc.json("POST", "/v1/execute", {"command": "sleep", "args": {"ms": 1500}})
            with lock:
                replies.append(r)

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        svc.wait_status(lambda s: s["busy"] == 3)
        svc.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(HANG_GUARD)
        self.assertEqual([code for code, _ in replies], [200, 200, 200], replies)
        self.assertEqual(svc.proc.wait(HANG_GUARD), 0)
        # Nothing is accepted any more, and no worker is left.
        with self.assertRaises(OSError):
            http.client.HTTPConnection("127.0.0.1", svc.port, timeout=5).request("GET", "/healthz")
        for pid in pids:
            self.assertFalse(alive(pid), f"worker {pid} left behind")
        svc.stop()


if __name__ == "__main__":
    unittest.main()
