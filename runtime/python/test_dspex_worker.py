"""Unit tests of the bundled worker (dspex_worker.py).

Most tests start the worker as a real subprocess and speak the framed protocol
over its pipes (see WorkerProcess).  Every read has a timeout, so a broken
worker fails a test instead of hanging it, and every started process is killed
and reaped by a cleanup.

Run: cd runtime/python && python3 -m unittest discover -s . -p 'test_*.py' -v
"""

import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.dont_write_bytecode = True  # do not leave __pycache__ next to the worker
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "dspex_worker.py")
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import dspex_worker as dw  # noqa: E402  (after the sys.path set-up)

READ_TIMEOUT = 5.0
QA_SIGNATURE = {
    "name": "question_answer",
    "description": "Answer the question.",
    "inputs": [{"name": "question", "description": "a question", "type": "str"}],
    "outputs": [{"name": "answer", "description": "the answer", "type": "str"}],
}
TYPED_SIGNATURE = {
    "inputs": [{"name": "text"}, {"name": "2nd input"}],
    "outputs": [
        {"name": "s"},
        {"name": "s2", "type": "string"},
        {"name": "i", "type": "int"},
        {"name": "i2", "type": "integer"},
        {"name": "f", "type": "float"},
        {"name": "f2", "type": "number"},
        {"name": "b", "type": "bool"},
        {"name": "b2", "type": "boolean"},
        {"name": "l", "type": "list"},
        {"name": "l2", "type": "array"},
        {"name": "d", "type": "dict"},
        {"name": "d2", "type": "object"},
    ],
}

_started = []  # every WorkerProcess, so tearDownModule can make sure none is left


def tearDownModule():
    for worker in _started:
        worker.close()


def nested(depth, leaf="1"):
    """JSON text of a value `depth` levels deep (built as text: json.dumps would recurse)."""
    half = depth // 2
    return "[" * half + '{"k":' * (depth - half) + leaf + "}" * (depth - half) + "]" * half


def runtime_request(request_id, command, args_text):
    """A request frame body exactly as the runtime encodes it (encode_request: id first, compact)."""
    return ('{"id":%d,"command":"%s","args":%s,"timestamp":"2026-11-26T14:00:00.000000Z"}'
            % (request_id, command, args_text)).encode("utf-8")


def reference_text_depth(text):
    """The runtime's json_text_depth (json_limits.cpp), byte by byte, for comparison."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                in_string = False
            continue
        if c == 0x22:
            in_string = True
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}" and depth > 0:
            depth -= 1
    return deepest


class WorkerProcess:
    """A worker subprocess and a framed-protocol client with read timeouts."""

    def __init__(self, *flags, worker_id="test-worker", mode="pool-worker", launcher=None):
        argv = list(launcher or [sys.executable, SCRIPT])
        if mode is not None:
            argv += ["--mode", mode]
        if worker_id is not None:
            argv += ["--worker-id", worker_id]
        argv += list(flags)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=HERE, start_new_session=True)
        _started.append(self)
        self._buffer = b""
        self._next_id = 1
        self.stderr_lines = []
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()

    def _drain_stderr(self):
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr_lines.append(line.decode("utf-8", "replace").rstrip("\n"))

    # ---- raw I/O

    def send_raw(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, obj):
        self.send_body(json.dumps(obj).encode("utf-8"))

    def send_body(self, body):
        self.send_raw(struct.pack(">I", len(body)) + body)

    def close_stdin(self):
        self.proc.stdin.close()

    def read_exact(self, n, timeout=READ_TIMEOUT):
        """n bytes from stdout; fewer only at EOF; TimeoutError if they do not come."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while len(self._buffer) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no data from the worker within {timeout} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def read_frame_body(self, timeout=READ_TIMEOUT):
        """The next frame's body bytes, or None on EOF at a frame boundary."""
        header = self.read_exact(4, timeout)
        if not header:
            return None
        if len(header) < 4:
            raise AssertionError(f"EOF inside a frame header: {header!r}")
        (length,) = struct.unpack(">I", header)
        body = self.read_exact(length, timeout)
        if len(body) < length:
            raise AssertionError(f"EOF inside a frame body ({len(body)} of {length} bytes)")
        return body

    def read_reply(self, timeout=READ_TIMEOUT):
        body = self.read_frame_body(timeout)
        if body is None:
            raise AssertionError("EOF instead of a reply")
        return json.loads(body.decode("utf-8"))

    def assert_eof(self, timeout=READ_TIMEOUT):
        data = self.read_exact(1, timeout)
        if data:
            raise AssertionError(f"expected EOF on stdout, got {data!r}")

    # ---- requests

    def request(self, command, args=None, session_id="anonymous", request_id=None, timeout=READ_TIMEOUT):
        """Send one request; return the whole reply (after checking that its id echoes ours)."""
        if request_id is None:
            request_id = self._next_id
            self._next_id += 1
        full_args = {"session_id": session_id}
        full_args.update(args or {})
        self.send({"id": request_id, "command": command, "args": full_args,
                   "timestamp": "2026-11-26T14:00:00.000000Z"})
        reply = self.read_reply(timeout)
        if reply.get("id") != request_id:
            raise AssertionError(f"reply id {reply.get('id')} for request {request_id}: {reply}")
        return reply

    def ok(self, command, args=None, **kw):
        """The result of a request that must succeed."""
        reply = self.request(command, args, **kw)
        if reply.get("success") is not True:
            raise AssertionError(f"{command} failed: {reply}")
        return reply["result"]

    def error(self, command, args=None, **kw):
        """The error message of a request that must fail."""
        reply = self.request(command, args, **kw)
        if reply.get("success") is not False or not isinstance(reply.get("error"), str):
            raise AssertionError(f"{command} was expected to fail: {reply}")
        return reply["error"]

    def init(self):
        return self.request("ping", {"initialization": True, "worker_id": "test-worker"}, request_id=0)

    # ---- process

    def wait(self, timeout=READ_TIMEOUT):
        return self.proc.wait(timeout)

    def stderr_text(self, settle=0.0):
        if self.proc.poll() is not None:
            self._stderr_thread.join(READ_TIMEOUT)
        elif settle:
            time.sleep(settle)
        return "\n".join(self.stderr_lines)

    def close(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(READ_TIMEOUT)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._stderr_thread.join(READ_TIMEOUT)
        self.proc.stderr.close()


class WorkerTestCase(unittest.TestCase):
    def start(self, *flags, init=True, **kw):
        worker = WorkerProcess(*flags, **kw)
        self.addCleanup(worker.close)
        if init:
            reply = worker.init()
            self.assertTrue(reply["success"], reply)
        return worker

    def start_with_lm(self, *flags, **kw):
        worker = self.start(*flags, **kw)
        worker.ok("configure_lm", {"provider": "mock", "model": "mock"})
        return worker


# =========================================================================== pure functions


class PureFunctionTests(unittest.TestCase):
    def test_sanitize_identifier(self):
        cases = {
            "question": "question",
            "my field": "my_field",
            "a-b.c": "a_b_c",
            "2nd": "_2nd",
            "class": "class_",
            "None": "None_",
            "héllo": "h_llo",
            "_ok_": "_ok_",
        }
        for name, expected in cases.items():
            with self.subTest(name=name):
                self.assertEqual(dw.sanitize_identifier(name), expected)
                self.assertTrue(dw.sanitize_identifier(name).isidentifier())

    def test_signature_class_name(self):
        self.assertEqual(dw.signature_class_name({"name": "question_answer"}), "QuestionAnswer")
        self.assertEqual(dw.signature_class_name({"name": "My.Module.qa sig"}), "QaSig")
        self.assertEqual(dw.signature_class_name({"name": "2step"}), "Signature2step")
        anonymous = dw.signature_class_name({"inputs": [], "outputs": [{"name": "x"}]})
        self.assertRegex(anonymous, r"^DynamicSignature_[0-9a-f]{8}$")
        self.assertEqual(anonymous, dw.signature_class_name({"outputs": [{"name": "x"}], "inputs": []}))
        self.assertNotEqual(anonymous, dw.signature_class_name({"inputs": [], "outputs": [{"name": "y"}]}))

    def test_normalize_type(self):
        self.assertEqual(dw.normalize_type(None), "str")
        self.assertEqual(dw.normalize_type("Integer"), "int")
        self.assertEqual(dw.normalize_type("number"), "float")
        self.assertEqual(dw.normalize_type("list[str]"), "list")
        self.assertEqual(dw.normalize_type("something-else"), "str")
        with self.assertRaises(dw.CommandError):
            dw.normalize_type(3)

    def test_signature_mapping_and_collisions(self):
        sig = dw.Signature({"inputs": [{"name": "a-b"}, {"name": "a_b"}], "outputs": [{"name": "for"}]})
        self.assertEqual(sig.field_mapping, {"a-b": "a_b", "a_b": "a_b_2", "for": "for_"})
        self.assertEqual(len(set(sig.field_mapping.values())), 3)

    def test_signature_validation(self):
        bad = [
            "not an object",
            {"inputs": [{"name": "q"}]},  # no outputs
            {"inputs": [], "outputs": []},  # empty outputs
            {"inputs": "q", "outputs": [{"name": "a"}]},
            {"inputs": ["q"], "outputs": [{"name": "a"}]},
            {"inputs": [{"name": ""}], "outputs": [{"name": "a"}]},
            {"inputs": [{"description": "no name"}], "outputs": [{"name": "a"}]},
            {"inputs": [{"name": 5}], "outputs": [{"name": "a"}]},
            {"inputs": [{"name": "x"}], "outputs": [{"name": "x"}]},  # duplicate
        ]
        for definition in bad:
            with self.subTest(definition=definition):
                with self.assertRaises(dw.CommandError):
                    dw.Signature(definition)

    def test_mock_values_by_type(self):
        sig = dw.Signature(TYPED_SIGNATURE)
        outputs = dw.mock_outputs("p1", sig.outputs, {"text": "hi", "2nd input": 2})
        self.assertRegex(outputs["s"], r"^mock s [0-9a-f]{8}$")
        self.assertRegex(outputs["s2"], r"^mock s2 [0-9a-f]{8}$")
        for key, kind in (("i", int), ("i2", int), ("f", float), ("f2", float), ("b", bool), ("b2", bool),
                          ("l", list), ("l2", list), ("d", dict), ("d2", dict)):
            self.assertIs(type(outputs[key]), kind, key)
        self.assertTrue(all(isinstance(item, str) for item in outputs["l"]))
        json.dumps(outputs, allow_nan=False)  # JSON-serialisable

    def test_mock_values_deterministic(self):
        sig = dw.Signature(QA_SIGNATURE)
        first = dw.mock_outputs("p1", sig.outputs, {"question": "2+2?"})
        self.assertEqual(first, dw.mock_outputs("p1", sig.outputs, {"question": "2+2?"}))
        self.assertNotEqual(first, dw.mock_outputs("p2", sig.outputs, {"question": "2+2?"}))
        self.assertNotEqual(first, dw.mock_outputs("p1", sig.outputs, {"question": "3+3?"}))
        # Golden values pin the derivation (sha256 of canonical JSON): they must not change
        # between processes, machines or Python versions.
        self.assertEqual(dw.mock_value("p1", "answer", "str", {"question": "2+2?"}), "mock answer 8df44bdd")
        self.assertEqual(dw.mock_value("p1", "n", "int", {"question": "2+2?"}), 196)
        self.assertEqual(dw.mock_value("p1", "x", "float", {"question": "2+2?"}), 0.266298)
        # Key order of the inputs does not matter.
        self.assertEqual(dw.mock_value("p", "a", "str", {"x": 1, "y": 2}), dw.mock_value("p", "a", "str", {"y": 2, "x": 1}))

    def test_frame_channel_short_reads(self):
        """The reader reassembles a frame that arrives one byte at a time."""
        r, w = os.pipe()
        channel = dw.FrameChannel(r, w)
        body = json.dumps({"id": 1, "command": "ping", "args": {}}).encode()
        frame = struct.pack(">I", len(body)) + body

        def writer():
            for i in range(len(frame)):
                os.write(w, frame[i:i + 1])
                time.sleep(0.001)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            self.assertEqual(channel.read_frame(), body)
        finally:
            thread.join()
            os.close(w)
        try:
            self.assertIsNone(channel.read_frame())  # EOF at a frame boundary
        finally:
            channel.close()


    def test_json_text_depth_counts_like_the_runtime(self):
        long_string = json.dumps("[{" * 40000 + '\\"' * 30000)  # spans the 64 KiB scan chunks
        texts = [
            b"1", b'"[[["', b"[]", b"{}", b"[[1]]", b'{"a":{"b":[1,{"c":[]}]}}',
            b'["\\\\", "\\"[[", "]", {"x": "\\\\\\"{{"}]',
            json.dumps({"s": "\u00e9\u2028 [{", "l": [[["\\"]]]}, ensure_ascii=False).encode(),
            ("[" + long_string + ", [[" + long_string + "]]]").encode(),
            ("[" * 300 + "]" * 300).encode(), nested(5000).encode(),
        ]
        for text in texts:
            with self.subTest(text=text[:60]):
                self.assertEqual(dw.json_text_depth(text), reference_text_depth(text))
        self.assertEqual(dw.json_text_depth(nested(5000).encode(), limit=10), 11)  # stops past the limit
        self.assertEqual(dw.json_text_depth(b"[[1]]", limit=10), 2)
        self.assertFalse(dw.json_deeper_than(b"[[1]]", 2))
        self.assertTrue(dw.json_deeper_than(b"[[[1]]]", 2))
        self.assertFalse(dw.json_deeper_than(b'["[[[[[[[[[[", [], {}, [], {}, []]', 2))  # many openers, shallow
        self.assertTrue(dw.json_deeper_than(nested(5000).encode(), 128))

    def test_request_id_of_an_undecodable_body(self):
        cases = {
            b'{"id":42,"command":"ping","args":{': 42,
            b'{"id": 7, "command": "ping", "args": [[[': 7,  # json.dumps spacing
            b'{"id":0,"command"': 0,
            b'{"id":18446744073709551615,"command"': 2**64 - 1,
            b'{"id":18446744073709551616,"command"': 0,  # not a uint64
            b'{"id":007,"command"': 0,  # not JSON
            b'{"id":-3,"command"': 0,
            b'{"id":12': 0,  # no comma: not the runtime's prefix
            b'{"command":"ping","id":5,': 0,  # id not first
            b"\xff\xfe": 0,
        }
        for body, expected in cases.items():
            with self.subTest(body=body):
                self.assertEqual(dw.request_id_of(body), expected)


# =========================================================================== protocol


class ProtocolTests(WorkerTestCase):
    def test_init_ping(self):
        worker = self.start(init=False)
        reply = worker.init()
        self.assertEqual(reply["id"], 0)
        self.assertIs(reply["success"], True)
        self.assertIsInstance(reply["timestamp"], float)
        result = reply["result"]
        self.assertEqual(set(result), {"status", "worker_id", "mode", "uptime", "dspy_available", "lm", "timestamp"})
        self.assertEqual(result["status"], "ok")
        self.assertEqual(result["worker_id"], "test-worker")
        self.assertEqual(result["mode"], "pool-worker")
        self.assertIsInstance(result["uptime"], float)
        self.assertIsInstance(result["dspy_available"], bool)
        self.assertIsNone(result["lm"])
        self.assertIsInstance(result["timestamp"], float)

    def test_defaults_standalone_mode_and_worker_id(self):
        worker = self.start(worker_id=None, mode=None)
        result = worker.ok("ping")
        self.assertEqual(result["mode"], "standalone")
        self.assertEqual(result["worker_id"], f"standalone-{worker.proc.pid}")

    def test_start_message_on_stderr(self):
        worker = self.start(worker_id="worker-7")
        worker.close_stdin()
        self.assertEqual(worker.wait(), 0)
        self.assertIn(f"[worker-7] started (mode=pool-worker, pid={worker.proc.pid}", worker.stderr_text())

    def test_many_requests_in_order(self):
        worker = self.start()
        for i in range(1, 200):
            self.assertEqual(worker.request("ping", request_id=i)["id"], i)

    def test_large_request_and_reply(self):
        worker = self.start("--test-commands")
        blob = "x" * (3 * 1024 * 1024)
        self.assertEqual(worker.ok("echo", {"blob": blob})["blob"], blob)

    def test_unknown_command(self):
        worker = self.start()
        self.assertEqual(worker.error("frobnicate"), "Unknown command: frobnicate")
        self.assertEqual(worker.ok("ping")["status"], "ok")  # still healthy

    def test_invalid_json_replies_id_0_and_continues(self):
        worker = self.start()
        body = b"{not json"
        worker.send_raw(struct.pack(">I", len(body)) + body)
        reply = worker.read_reply()
        self.assertEqual(reply["id"], 0)
        self.assertIs(reply["success"], False)
        self.assertTrue(reply["error"].startswith("Invalid JSON: "), reply)
        self.assertEqual(worker.ok("ping")["status"], "ok")

    def test_invalid_utf8_and_non_object(self):
        worker = self.start()
        for body in (b"\xff\xfe\xfd", b"[1, 2, 3]"):
            worker.send_raw(struct.pack(">I", len(body)) + body)
            reply = worker.read_reply()
            self.assertEqual((reply["id"], reply["success"]), (0, False), reply)
        self.assertEqual(worker.ok("ping")["status"], "ok")

    def test_eof_at_frame_boundary_exits_0(self):
        worker = self.start()
        worker.close_stdin()
        worker.assert_eof()
        self.assertEqual(worker.wait(), 0)

    def test_eof_before_any_request_exits_0(self):
        worker = self.start(init=False)
        worker.close_stdin()
        self.assertEqual(worker.wait(), 0)

    def test_eof_mid_header_exits_1(self):
        worker = self.start()
        worker.send_raw(b"\x00\x00")
        worker.close_stdin()
        self.assertEqual(worker.wait(), 1)
        self.assertIn("EOF inside a frame", worker.stderr_text())

    def test_eof_mid_body_exits_1(self):
        worker = self.start()
        worker.send_raw(struct.pack(">I", 50) + b'{"id": 1')
        worker.close_stdin()
        self.assertEqual(worker.wait(), 1)
        worker.assert_eof()

    def test_zero_length_frame_exits_2(self):
        worker = self.start()
        worker.send_raw(struct.pack(">I", 0))
        self.assertEqual(worker.wait(), 2)
        self.assertIn("zero-length frame", worker.stderr_text())

    def test_oversize_frame_exits_2(self):
        worker = self.start()
        worker.send_raw(struct.pack(">I", 16 * 1024 * 1024 + 1))
        self.assertEqual(worker.wait(), 2)
        self.assertIn("exceeds max_frame_bytes", worker.stderr_text())

    def test_shutdown_replies_then_exits_0(self):
        worker = self.start(worker_id="w-shut")
        result = worker.ok("shutdown")
        self.assertEqual(result, {"status": "shutting_down", "worker_id": "w-shut"})
        worker.assert_eof()  # nothing after the reply
        self.assertEqual(worker.wait(), 0)

    def test_sigterm_exits_promptly(self):
        worker = self.start()
        worker.proc.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(), -signal.SIGTERM)

    def test_closed_stdout_exits_quietly(self):
        worker = self.start()
        worker.proc.stdout.close()
        worker.send({"id": 5, "command": "ping", "args": {"session_id": "anonymous"}})
        self.assertEqual(worker.wait(), 0)
        self.assertNotIn("Traceback", worker.stderr_text())

    def test_error_reply_shape(self):
        worker = self.start()
        reply = worker.request("delete_program", {"program_id": "nope"})
        self.assertEqual(set(reply), {"id", "success", "error", "timestamp"})
        self.assertIsInstance(reply["timestamp"], float)


# =========================================================================== commands


class CommandTests(WorkerTestCase):
    def create(self, worker, program_id="p1", signature=QA_SIGNATURE, session_id="anonymous", **extra):
        args = {"id": program_id, "signature": signature, "program_type": "predict"}
        args.update(extra)
        return worker.ok("create_program", args, session_id=session_id)

    def test_ping_after_lm(self):
        worker = self.start("--lm", "mock")
        self.assertEqual(worker.ok("ping")["lm"], "mock/mock")

    def test_configure_lm(self):
        worker = self.start()
        result = worker.ok("configure_lm", {"provider": "mock", "model": "mock-large", "temperature": 0.2})
        self.assertEqual(result, {"status": "configured", "provider": "mock", "model": "mock-large",
                                  "temperature": 0.2, "has_key": False})
        result = worker.ok("configure_lm", {"provider": "mock"})
        self.assertEqual(result, {"status": "configured", "provider": "mock", "model": "mock", "temperature": 0.7,
                                  "has_key": False})
        self.assertEqual(worker.ok("get_stats")["lm"], "mock/mock")

    def test_configure_lm_reads_the_key_from_the_variable_api_key_env_names(self):
        key = "sk-PLANTED-env-4b1d"
        os.environ["DSPEX_TEST_LM_KEY"] = key
        self.addCleanup(os.environ.pop, "DSPEX_TEST_LM_KEY", None)
        worker = self.start()  # inherits the variable, as the runtime's workers do
        result = worker.ok("configure_lm", {"provider": "mock", "model": "m", "api_key_env": "DSPEX_TEST_LM_KEY"})
        self.assertTrue(result["has_key"])
        self.assertNotIn(key, json.dumps(result))
        self.assertNotIn(key, json.dumps(worker.ok("get_stats")))
        # A variable that is not set, or not a variable's name: an error, and the LM stays as it was.
        self.assertEqual(worker.error("configure_lm", {"provider": "mock", "api_key_env": "DSPEX_TEST_NO_SUCH_VAR"}),
                         "the environment variable DSPEX_TEST_NO_SUCH_VAR (api_key_env) is not set")
        self.assertEqual(worker.error("configure_lm", {"provider": "mock", "api_key_env": "no-such name"}),
                         "api_key_env must name an environment variable")
        self.assertEqual(worker.ok("ping")["lm"], "mock/m")
        worker.close()
        self.assertFalse(any(key in line for line in worker.stderr_lines), worker.stderr_lines)

    def test_configure_lm_errors(self):
        worker = self.start()
        self.assertIn("provider", worker.error("configure_lm", {}))
        self.assertIn("temperature", worker.error("configure_lm", {"provider": "mock", "temperature": "hot"}))
        if not dw.dspy_installed():
            self.assertEqual(worker.error("configure_lm", {"provider": "openai", "model": "gpt-4o-mini"}),
                             "DSPy is not available: cannot configure provider openai")
        self.assertIsNone(worker.ok("ping")["lm"])  # a failed configure leaves no LM

    def test_create_program_shape(self):
        worker = self.start()
        signature = {"name": "qa", "inputs": [{"name": "the question"}, {"name": "1st"}],
                     "outputs": [{"name": "class", "type": "str"}]}
        result = self.create(worker, "p1", signature)
        self.assertEqual(set(result), {"program_id", "status", "signature", "program_type", "signature_class",
                                       "field_mapping", "fallback_used", "signature_def"})
        self.assertEqual(result["program_id"], "p1")
        self.assertEqual(result["status"], "created")
        self.assertEqual(result["signature"], signature)
        self.assertEqual(result["signature_def"], signature)
        self.assertEqual(result["program_type"], "predict")
        self.assertEqual(result["signature_class"], "Qa")
        self.assertEqual(result["field_mapping"], {"the question": "the_question", "1st": "_1st", "class": "class_"})
        self.assertIs(result["fallback_used"], False)

    def test_create_program_default_type_and_dynamic_class(self):
        worker = self.start()
        result = worker.ok("create_program", {"id": "p", "signature": {"inputs": [], "outputs": [{"name": "a"}]}})
        self.assertEqual(result["program_type"], "predict")
        self.assertRegex(result["signature_class"], r"^DynamicSignature_[0-9a-f]{8}$")

    def test_create_program_validation_errors(self):
        worker = self.start()
        self.assertIn("id", worker.error("create_program", {"signature": QA_SIGNATURE}))
        self.assertIn("signature", worker.error("create_program", {"id": "p"}))
        self.assertIn("outputs", worker.error("create_program", {"id": "p", "signature": {"inputs": []}}))
        self.assertIn("name", worker.error("create_program", {
            "id": "p", "signature": {"inputs": [{"name": ""}], "outputs": [{"name": "a"}]}}))
        self.assertEqual(worker.ok("list_programs")["total_count"], 0)

    def test_duplicate_id_in_one_session_is_an_error(self):
        worker = self.start()
        self.create(worker, "dup", session_id="s1")
        self.assertIn("dup", worker.error("create_program", {"id": "dup", "signature": QA_SIGNATURE},
                                          session_id="s1"))
        self.create(worker, "dup", session_id="s2")  # the same id in another session is fine

    def test_list_programs_is_per_session(self):
        worker = self.start()
        self.create(worker, "a1", session_id="A")
        self.create(worker, "a2", session_id="A")
        self.create(worker, "b1", session_id="B")
        listing = worker.ok("list_programs", session_id="A")
        self.assertEqual(set(listing), {"programs", "total_count"})
        self.assertEqual(listing["total_count"], 2)
        self.assertEqual(sorted(p["id"] for p in listing["programs"]), ["a1", "a2"])
        for entry in listing["programs"]:
            self.assertEqual(set(entry), {"id", "created_at", "execution_count", "last_executed",
                                          "signature", "session_id"})
            self.assertEqual(entry["session_id"], "A")
            self.assertEqual(entry["execution_count"], 0)
            self.assertIsNone(entry["last_executed"])
            self.assertEqual(entry["signature"], QA_SIGNATURE)
            self.assertIsInstance(entry["created_at"], float)
        listing = worker.ok("list_programs", session_id="B")
        self.assertEqual((listing["total_count"], listing["programs"][0]["id"]), (1, "b1"))
        self.assertEqual(worker.ok("list_programs", session_id="C"), {"programs": [], "total_count": 0})

    def test_anonymous_session_when_missing(self):
        worker = self.start()
        worker.send({"id": 7, "command": "create_program", "args": {"id": "p", "signature": QA_SIGNATURE}})
        self.assertTrue(worker.read_reply()["success"])
        listing = worker.ok("list_programs", session_id="anonymous")
        self.assertEqual(listing["programs"][0]["session_id"], "anonymous")

    def test_delete_program(self):
        worker = self.start()
        self.create(worker, "p1", session_id="s1")
        self.assertEqual(worker.error("delete_program", {"program_id": "p1"}, session_id="s2"),
                         "Program not found: p1")
        self.assertEqual(worker.ok("delete_program", {"program_id": "p1"}, session_id="s1"),
                         {"program_id": "p1", "status": "deleted"})
        self.assertEqual(worker.error("delete_program", {"program_id": "p1"}, session_id="s1"),
                         "Program not found: p1")
        self.assertEqual(worker.ok("list_programs", session_id="s1")["total_count"], 0)

    def test_get_program_info(self):
        worker = self.start_with_lm()
        self.create(worker, "p1")
        info = worker.ok("get_program_info", {"program_id": "p1"})
        self.assertEqual(set(info), {"program_id", "signature", "created_at", "execution_count", "last_executed"})
        self.assertEqual((info["program_id"], info["signature"]), ("p1", QA_SIGNATURE))
        self.assertEqual((info["execution_count"], info["last_executed"]), (0, None))
        worker.ok("execute_program", {"program_id": "p1", "inputs": {"question": "q"}})
        worker.ok("execute_program", {"program_id": "p1", "inputs": {"question": "q"}})
        info = worker.ok("get_program_info", {"program_id": "p1"})
        self.assertEqual(info["execution_count"], 2)
        self.assertGreaterEqual(info["last_executed"], info["created_at"])
        self.assertEqual(worker.error("get_program_info", {"program_id": "zz"}), "Program not found: zz")

    def test_execute_program_shape(self):
        worker = self.start_with_lm()
        self.create(worker, "p1")
        before = time.time()
        result = worker.ok("execute_program", {"program_id": "p1", "inputs": {"question": "2+2?"}})
        self.assertEqual(set(result), {"program_id", "outputs", "execution_time", "lm"})
        self.assertEqual(result["program_id"], "p1")
        self.assertEqual(list(result["outputs"]), ["answer"])
        self.assertRegex(result["outputs"]["answer"], r"^mock answer [0-9a-f]{8}$")
        self.assertIsInstance(result["execution_time"], float)
        self.assertGreaterEqual(result["execution_time"], before - 1)

    def test_execute_typed_outputs_and_sanitised_input_names(self):
        worker = self.start_with_lm()
        self.create(worker, "typed", TYPED_SIGNATURE)
        by_original = worker.ok("execute_program", {"program_id": "typed",
                                                    "inputs": {"text": "hi", "2nd input": 2}})["outputs"]
        by_sanitised = worker.ok("execute_program", {"program_id": "typed",
                                                     "inputs": {"text": "hi", "_2nd_input": 2}})["outputs"]
        self.assertEqual(by_original, by_sanitised)
        sig = dw.Signature(TYPED_SIGNATURE)
        self.assertEqual(by_original, dw.mock_outputs("typed", sig.outputs, {"text": "hi", "2nd input": 2}))
        for key, kind in (("s", str), ("i", int), ("f", float), ("b", bool), ("l", list), ("d", dict)):
            self.assertIs(type(by_original[key]), kind, key)

    def test_execute_without_lm(self):
        worker = self.start()
        self.create(worker, "p1")
        self.assertEqual(worker.error("execute_program", {"program_id": "p1", "inputs": {"question": "q"}}),
                         "No LM is loaded.")

    def test_execute_missing_input_field(self):
        worker = self.start_with_lm()
        self.create(worker, "p1")
        self.assertEqual(worker.error("execute_program", {"program_id": "p1", "inputs": {"other": 1}}),
                         "Missing required input field: question")
        self.assertEqual(worker.ok("get_program_info", {"program_id": "p1"})["execution_count"], 0)

    def test_execute_unknown_program(self):
        worker = self.start_with_lm()
        self.assertEqual(worker.error("execute_program", {"program_id": "ghost", "inputs": {}}),
                         "Program not found: ghost")
        self.create(worker, "p1", session_id="s1")
        self.assertEqual(worker.error("execute_program", {"program_id": "p1", "inputs": {"question": "q"}},
                                      session_id="s2"), "Program not found: p1")

    def test_mock_is_deterministic_across_processes(self):
        results = []
        for _ in range(2):
            worker = self.start_with_lm()
            self.create(worker, "det", TYPED_SIGNATURE)
            results.append(worker.ok("execute_program", {"program_id": "det",
                                                         "inputs": {"text": "same", "2nd input": [1, 2]}})["outputs"])
            worker.close()
        self.assertEqual(results[0], results[1])

    def test_outputs_depend_on_inputs_and_program(self):
        worker = self.start_with_lm()
        self.create(worker, "p1")
        self.create(worker, "p2")
        run = lambda pid, q: worker.ok("execute_program", {"program_id": pid, "inputs": {"question": q}})["outputs"]
        self.assertEqual(run("p1", "a"), run("p1", "a"))
        self.assertNotEqual(run("p1", "a"), run("p1", "b"))
        self.assertNotEqual(run("p1", "a"), run("p2", "a"))

    def test_program_data_rebuilds_on_a_fresh_worker(self):
        first = self.start_with_lm()
        self.create(first, "shared", session_id="s1")
        expected = first.ok("execute_program", {"program_id": "shared", "inputs": {"question": "q"}},
                            session_id="s1")["outputs"]
        fresh = self.start_with_lm()
        program_data = {"id": "shared", "signature": QA_SIGNATURE, "program_type": "predict"}
        result = fresh.ok("execute_program", {"program_id": "shared", "inputs": {"question": "q"},
                                              "program_data": program_data}, session_id="s1")
        self.assertEqual(result["outputs"], expected)
        # The rebuilt program is cached in that session: it now runs without program_data.
        listing = fresh.ok("list_programs", session_id="s1")
        self.assertEqual((listing["total_count"], listing["programs"][0]["execution_count"]), (1, 1))
        fresh.ok("execute_program", {"program_id": "shared", "inputs": {"question": "q"}}, session_id="s1")

    def test_program_data_wins_over_a_stale_cached_program(self):
        worker = self.start_with_lm()
        self.create(worker, "p", session_id="s1")
        other = {"id": "p", "program_type": "predict",
                 "signature": {"inputs": [{"name": "text"}], "outputs": [{"name": "label"}]}}
        result = worker.ok("execute_program", {"program_id": "p", "inputs": {"text": "t"},
                                               "program_data": other}, session_id="s1")
        self.assertEqual(list(result["outputs"].keys()), ["label"])
        # The same definition again keeps the cached program (and its count).
        worker.ok("execute_program", {"program_id": "p", "inputs": {"text": "t"},
                                      "program_data": other}, session_id="s1")
        info = worker.ok("get_program_info", {"program_id": "p"}, session_id="s1")
        self.assertEqual(info["execution_count"], 2)

    def test_lm_override_runs_one_execution_on_the_sessions_lm(self):
        worker = self.start_with_lm()
        self.create(worker, "p", session_id="s1")
        args = {"program_id": "p", "inputs": {"question": "q"}}
        self.assertEqual(worker.ok("execute_program", args, session_id="s1")["lm"], "mock/mock")
        override = dict(args, lm_override={"provider": "mock", "model": "session-model"})
        self.assertEqual(worker.ok("execute_program", override, session_id="s1")["lm"],
                         "mock/session-model")
        # The worker's own LM is unchanged.
        self.assertEqual(worker.ok("execute_program", args, session_id="s1")["lm"], "mock/mock")
        bad = dict(args, lm_override={"model": "x"})
        self.assertIn("provider", worker.error("execute_program", bad, session_id="s1"))

    def test_program_data_with_program_id_key_and_errors(self):
        worker = self.start_with_lm()
        data = {"program_id": "x", "signature": QA_SIGNATURE}
        worker.ok("execute_program", {"program_id": "x", "inputs": {"question": "q"}, "program_data": data})
        self.assertIn("does not match", worker.error("execute_program", {
            "program_id": "y", "inputs": {"question": "q"}, "program_data": data}))
        self.assertIn("signature", worker.error("execute_program", {
            "program_id": "z", "inputs": {}, "program_data": {"id": "z"}}))

    def test_get_stats(self):
        worker = self.start()
        self.create(worker, "p1", session_id="s1")
        self.create(worker, "p2", session_id="s2")
        worker.error("frobnicate")
        stats = worker.ok("get_stats")
        self.assertEqual(set(stats), {"programs_count", "command_count", "error_count", "uptime",
                                      "memory_usage", "dspy_available", "lm", "lm_has_key"})
        self.assertEqual(stats["programs_count"], 2)
        self.assertEqual(stats["command_count"], 5)  # init ping, 2 creates, frobnicate, get_stats
        self.assertEqual(stats["error_count"], 1)
        self.assertIsInstance(stats["uptime"], float)
        self.assertEqual(set(stats["memory_usage"]), {"rss"})
        self.assertIsInstance(stats["memory_usage"]["rss"], int)
        self.assertGreater(stats["memory_usage"]["rss"], 1024 * 1024)
        self.assertIsInstance(stats["dspy_available"], bool)
        self.assertIsNone(stats["lm"])

    def test_cleanup(self):
        worker = self.start()
        self.create(worker, "p1", session_id="s1")
        self.create(worker, "p2", session_id="s2")
        self.assertEqual(worker.ok("cleanup"), {"status": "cleaned", "programs_removed": 2})
        self.assertEqual(worker.ok("get_stats")["programs_count"], 0)
        self.assertEqual(worker.ok("cleanup"), {"status": "cleaned", "programs_removed": 0})

    def test_reset_state(self):
        worker = self.start()
        self.create(worker, "p1")
        worker.error("frobnicate")
        result = worker.ok("reset_state")
        # init ping, create, frobnicate, reset_state itself
        self.assertEqual(result, {"status": "reset", "programs_cleared": 1, "commands_reset": 4, "errors_reset": 1})
        stats = worker.ok("get_stats")
        self.assertEqual((stats["programs_count"], stats["command_count"], stats["error_count"]), (0, 1, 0))

    def test_cleanup_session_really_drops(self):
        worker = self.start_with_lm()
        self.create(worker, "p1", session_id="s1")
        self.create(worker, "p2", session_id="s1")
        self.create(worker, "p1", session_id="s2")
        self.assertEqual(worker.ok("cleanup_session", session_id="s1"),
                         {"status": "cleaned", "session_id": "s1", "programs_removed": 2})
        self.assertEqual(worker.ok("list_programs", session_id="s1"), {"programs": [], "total_count": 0})
        self.assertEqual(worker.error("execute_program", {"program_id": "p1", "inputs": {"question": "q"}},
                                      session_id="s1"), "Program not found: p1")
        self.assertEqual(worker.ok("list_programs", session_id="s2")["total_count"], 1)
        self.create(worker, "p1", session_id="s1")  # the id is free again
        self.assertEqual(worker.ok("cleanup_session", session_id="nobody")["programs_removed"], 0)

    def test_non_object_args_is_an_error_reply(self):
        worker = self.start()
        worker.send({"id": 99, "command": "ping", "args": [1, 2]})
        reply = worker.read_reply()
        self.assertEqual((reply["id"], reply["success"]), (99, False), reply)
        self.assertIn("args must be an object", reply["error"])
        self.assertEqual(worker.ok("ping")["status"], "ok")

    def test_handler_exception_keeps_worker_alive(self):
        """An unexpected exception in a handler is a success:false reply, not a crash."""
        code = ("import sys, dspex_worker as d\n"
                "def broken(self, args):\n"
                "    print('stray print from a handler')\n"
                "    raise KeyError('boom')\n"
                "d.Worker.cmd_list_programs = broken\n"
                "sys.exit(d.main(sys.argv[1:]))\n")
        worker = self.start(launcher=[sys.executable, "-c", code])
        self.assertEqual(worker.error("list_programs"), "KeyError: 'boom'")
        self.assertEqual(worker.ok("ping")["status"], "ok")  # the stray print did not corrupt stdout
        worker.close_stdin()
        self.assertEqual(worker.wait(), 0)
        text = worker.stderr_text()
        self.assertIn("stray print from a handler", text)
        self.assertIn("Traceback", text)


# =========================================================================== limits (depth, frame size)


class LimitTests(WorkerTestCase):
    def send_runtime_request(self, worker, request_id, command, args_text):
        worker.send_body(runtime_request(request_id, command, args_text))
        return worker.read_reply()

    def test_deep_request_is_an_error_reply_with_its_id(self):
        """Args nested 5000 deep used to kill the worker (RecursionError in json.loads)."""
        worker = self.start()
        args = '{"session_id":"s1","program_id":"p1","inputs":{"question":%s}}' % nested(5000, '"q"')
        for request_id in (41, 42):  # a retry onto the same worker is answered too
            reply = self.send_runtime_request(worker, request_id, "execute_program", args)
            self.assertEqual((reply["id"], reply["success"]), (request_id, False), reply)
            self.assertTrue(reply["error"].startswith("Invalid request: JSON nested deeper than 128 levels"),
                            reply)
        # Not first in the body, the id cannot be recovered without decoding: id 0.
        worker.send_body(('{"command":"ping","args":{"x":%s},"id":43}' % nested(5000)).encode())
        reply = worker.read_reply()
        self.assertEqual((reply["id"], reply["success"]), (0, False), reply)
        self.assertEqual(worker.ok("ping")["status"], "ok")
        stats = worker.ok("get_stats")
        self.assertEqual((stats["command_count"], stats["error_count"]), (6, 3))
        self.assertIsNone(worker.proc.poll())

    def test_depth_bound_counts_args_as_the_runtime_does(self):
        """--max-json-depth N: args may nest N levels ({} is 1), as pool.max_json_depth allows."""
        worker = self.start("--max-json-depth", "10")
        ok = self.send_runtime_request(worker, 5, "ping", '{"session_id":"a","x":%s}' % nested(9))
        self.assertEqual((ok["id"], ok["success"]), (5, True), ok)
        deep = self.send_runtime_request(worker, 6, "ping", '{"session_id":"a","x":%s}' % nested(10))
        self.assertEqual((deep["id"], deep["success"]), (6, False), deep)
        self.assertTrue(deep["error"].startswith("Invalid request: JSON nested deeper than 10 levels"), deep)
        # Brackets inside strings do not count; many shallow containers are fine (the exact scan).
        shallow = json.dumps({"session_id": "a", "text": '[{"\\' * 500,
                              "rows": [{"n": [i]} for i in range(300)]})
        reply = self.send_runtime_request(worker, 7, "ping", shallow)
        self.assertEqual((reply["id"], reply["success"]), (7, True), reply)

    def test_undecodable_request_keeps_its_id_from_the_prefix(self):
        worker = self.start()
        for request_id, body in ((17, b'{"id":17,"command":"ping","args":{'),  # truncated JSON
                                 (18, b'{"id":18,"command":"\xff\xfe"}'),  # not UTF-8
                                 (19, b'{"id": 19, "command": ping}')):  # json.dumps spacing, bad JSON
            with self.subTest(body=body):
                worker.send_body(body)
                reply = worker.read_reply()
                self.assertEqual((reply["id"], reply["success"]), (request_id, False), reply)
        worker.send_body(b'{not json')
        self.assertEqual(worker.read_reply()["id"], 0)
        self.assertEqual(worker.ok("ping")["status"], "ok")

    def test_reply_deeper_than_the_bound_is_an_error_reply(self):
        """The runtime drops a worker whose reply nests deeper than max_json_depth: never send one."""
        worker = self.start("--test-commands", "--max-json-depth", "10")
        # echo: the reply {"result": args} is one level deeper than args, two deeper than x.
        fits = self.send_runtime_request(worker, 3, "echo", '{"session_id":"a","x":%s}' % nested(8))
        self.assertEqual((fits["id"], fits["success"]), (3, True), fits)
        # args 10 deep are a valid request, but their echo would be 11 deep.
        reply = self.send_runtime_request(worker, 4, "echo", '{"session_id":"a","x":%s}' % nested(9))
        self.assertEqual((reply["id"], reply["success"]), (4, False), reply)
        self.assertEqual(reply["error"], "Reply not encodable as JSON: nested deeper than 10 levels")
        self.assertEqual(worker.ok("ping")["status"], "ok")
        self.assertIn("Reply not encodable as JSON", worker.stderr_text(settle=0.2))

    def test_recursion_error_anywhere_is_an_error_reply(self):
        """RecursionError while decoding, handling or encoding: an error reply, never an exit."""
        code = ("import sys, dspex_worker as d\n"
                "d.json_deeper_than = lambda text, limit: False  # as if the bound were missed\n"
                "def recurse(self, args):\n"
                "    return recurse(self, args)\n"
                "def too_deep(self, args):\n"
                "    value = []\n"
                "    for _ in range(100000):\n"
                "        value = [value]\n"
                "    return value\n"
                "d.Worker.cmd_list_programs = recurse\n"
                "d.Worker.cmd_get_program_info = too_deep\n"
                "sys.exit(d.main(sys.argv[1:]))\n")
        worker = self.start(launcher=[sys.executable, "-c", code])
        reply = self.send_runtime_request(worker, 8, "ping", '{"session_id":"a","x":%s}' % nested(5000))
        self.assertEqual((reply["id"], reply["success"]), (8, False), reply)
        self.assertTrue(reply["error"].startswith("Invalid request: JSON nested too deep to decode"), reply)
        self.assertTrue(worker.error("list_programs").startswith("RecursionError: maximum recursion depth"))
        reply = worker.request("get_program_info", request_id=9)
        self.assertEqual((reply["id"], reply["success"]), (9, False), reply)
        self.assertTrue(reply["error"].startswith("Reply not encodable as JSON: nested too deep"), reply)
        self.assertEqual(worker.ok("ping")["status"], "ok")
        worker.close_stdin()
        self.assertEqual(worker.wait(), 0)

    def test_max_json_depth_1000_is_served_in_full(self):
        """The runtime's largest bound: everything within it is decoded and encoded (recursion limit)."""
        worker = self.start("--test-commands", "--max-json-depth", "1000")
        ok = self.send_runtime_request(worker, 1, "ping", '{"session_id":"a","x":%s}' % nested(999))
        self.assertEqual((ok["id"], ok["success"]), (1, True), ok)
        worker.send_body(runtime_request(2, "echo", '{"session_id":"a","x":%s}' % nested(998)))
        body = worker.read_frame_body()  # 1000 deep: more than this process's json.loads takes
        self.assertTrue(body.startswith(b'{"id":2,"success":true,"result":{'), body[:80])
        self.assertEqual(dw.json_text_depth(body), 1000)
        deep = self.send_runtime_request(worker, 3, "ping", '{"session_id":"a","x":%s}' % nested(1000))
        self.assertTrue(deep["error"].startswith("Invalid request: JSON nested deeper than 1000 levels"), deep)

    def test_max_frame_bytes_above_16_mib(self):
        """A request over the old hard-coded 16 MiB used to kill the worker; its reply is allowed too."""
        worker = self.start("--test-commands", "--max-frame-bytes", str(24 * 1024 * 1024))
        blob = "x" * (17 * 1024 * 1024)
        reply = worker.request("echo", {"blob": blob}, timeout=30)
        self.assertIs(reply["success"], True)
        self.assertEqual(reply["result"]["blob"], blob)
        self.assertEqual(worker.ok("ping")["status"], "ok")

    def test_max_frame_bytes_below_default(self):
        worker = self.start("--test-commands", "--max-frame-bytes", "4096")
        self.assertEqual(len(worker.ok("echo", {"blob": "y" * 3000})["blob"]), 3000)
        # The request fits (2 bytes per "é"), its reply does not (escaped as \u00e9, 6 bytes).
        reply = self.send_runtime_request(worker, 77, "echo", '{"session_id":"a","blob":"%s"}' % ("é" * 1500))
        self.assertEqual((reply["id"], reply["success"]), (77, False), reply)
        self.assertRegex(reply["error"], r"^Reply too large: \d+ bytes exceeds 4096$")
        self.assertEqual(worker.ok("ping")["status"], "ok")
        worker.send_raw(struct.pack(">I", 4097))
        self.assertEqual(worker.wait(), 2)
        self.assertIn("exceeds max_frame_bytes 4096", worker.stderr_text())

    def test_limit_flags_in_every_mode(self):
        limits = ("--max-frame-bytes", "16777216", "--max-json-depth", "128")
        variants = [dict(mode="pool-worker"), dict(mode="standalone"), dict(mode=None, worker_id=None)]
        for kw in variants:
            with self.subTest(**kw):
                worker = self.start(*limits, **kw)
                self.assertEqual(worker.ok("ping")["status"], "ok")
        worker = self.start("--test-commands", "--test-init", "error", *limits, init=False)
        self.assertEqual(worker.init()["error"], "init refused (test-init error)")
        worker = self.start("--lm", "mock", *limits, "--test-commands")
        self.assertEqual(worker.ok("ping")["lm"], "mock/mock")

    def test_limit_flags_help_and_validation(self):
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        done = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                              timeout=READ_TIMEOUT, env=env)
        self.assertEqual(done.returncode, 0)
        self.assertIn("--max-frame-bytes N", done.stdout)
        self.assertIn("--max-json-depth N", done.stdout)
        self.assertIn("--max-frame-bytes", dw.__doc__)
        self.assertIn("--max-json-depth", dw.__doc__)
        for flag, value in (("--max-json-depth", "0"), ("--max-json-depth", "10001"), ("--max-json-depth", "x"),
                            ("--max-frame-bytes", "0"), ("--max-frame-bytes", str(2**32)),
                            ("--max-frame-bytes", "-5")):
            with self.subTest(flag=flag, value=value):
                done = subprocess.run([sys.executable, SCRIPT, flag, value], capture_output=True, text=True,
                                      stdin=subprocess.DEVNULL, timeout=READ_TIMEOUT, env=env)
                self.assertEqual(done.returncode, 2)
                self.assertIn(flag, done.stderr)


# =========================================================================== test-only commands


TEST_COMMANDS = ("echo", "sleep", "crash", "garbage", "hang", "stderr", "alloc", "fail_pings")


class TestOnlyCommandTests(WorkerTestCase):
    def test_refused_without_flag(self):
        worker = self.start()
        for command in TEST_COMMANDS:
            with self.subTest(command=command):
                self.assertEqual(worker.error(command, {"code": 4, "kind": "noise"}), f"Unknown command: {command}")
        self.assertEqual(worker.ok("ping")["status"], "ok")

    def test_echo(self):
        worker = self.start("--test-commands")
        self.assertEqual(worker.ok("echo", {"a": [1, {"b": None}], "s": "ü"}, session_id="s9"),
                         {"session_id": "s9", "a": [1, {"b": None}], "s": "ü"})

    def test_sleep(self):
        worker = self.start("--test-commands")
        start = time.monotonic()
        result = worker.ok("sleep", {"ms": 200})
        self.assertGreaterEqual(time.monotonic() - start, 0.19)
        self.assertEqual(result, {"slept_ms": 200})

    def test_sleep_until_file(self):
        worker = self.start("--test-commands")
        with tempfile.TemporaryDirectory() as scratch:
            gate = os.path.join(scratch, "gate")
            # No gate: bounded by ms.
            self.assertEqual(worker.ok("sleep", {"ms": 20, "until_file": gate}),
                             {"slept_ms": 20, "released": False})
            # Busy until the gate exists, long before its minute is up.
            worker.send({"id": 41, "command": "sleep",
                         "args": {"session_id": "anonymous", "ms": 60000, "until_file": gate}})
            open(gate, "w").close()
            reply = worker.read_reply()
            self.assertEqual(reply["id"], 41)
            self.assertEqual(reply["result"], {"slept_ms": 60000, "released": True})
            self.assertEqual(worker.error("sleep", {"ms": 1, "until_file": 3}),
                             "until_file must be a non-empty string")

    def test_crash_before_reply(self):
        worker = self.start("--test-commands")
        worker.send({"id": 1, "command": "crash", "args": {"session_id": "anonymous", "code": 7}})
        worker.assert_eof()
        self.assertEqual(worker.wait(), 7)

    def test_crash_default_code(self):
        worker = self.start("--test-commands")
        worker.send({"id": 1, "command": "crash", "args": {"session_id": "anonymous"}})
        worker.assert_eof()
        self.assertEqual(worker.wait(), 1)

    def test_crash_mid_frame(self):
        worker = self.start("--test-commands")
        worker.send({"id": 1, "command": "crash", "args": {"session_id": "anonymous", "code": 5,
                                                           "when": "mid_frame"}})
        header = worker.read_exact(4)
        (announced,) = struct.unpack(">I", header)
        body = worker.read_exact(announced)
        self.assertLess(len(body), announced)  # truncated by EOF
        self.assertGreater(len(body), 0)
        self.assertEqual(worker.wait(), 5)

    def test_garbage_bad_json(self):
        worker = self.start("--test-commands")
        worker.send({"id": 1, "command": "garbage", "args": {"kind": "bad_json"}})
        body = worker.read_frame_body()
        with self.assertRaises(ValueError):
            json.loads(body)
        self.assertEqual(worker.ok("ping")["status"], "ok")

    def test_garbage_wrong_id(self):
        worker = self.start("--test-commands")
        worker.send({"id": 5, "command": "garbage", "args": {"kind": "wrong_id"}})
        reply = worker.read_reply()
        self.assertEqual(reply["id"], 1005)
        self.assertIs(reply["success"], True)

    def test_garbage_oversize_header(self):
        worker = self.start("--test-commands")
        worker.send({"id": 1, "command": "garbage", "args": {"kind": "oversize_header"}})
        self.assertEqual(struct.unpack(">I", worker.read_exact(4))[0], 0xFFFFFFF0)
        with self.assertRaises(TimeoutError):
            worker.read_exact(1, timeout=0.3)  # then nothing
        self.assertIsNone(worker.proc.poll())

    def test_garbage_noise(self):
        worker = self.start("--test-commands")
        worker.send({"id": 1, "command": "garbage", "args": {"kind": "noise"}})
        (announced,) = struct.unpack(">I", worker.read_exact(4))
        self.assertGreater(announced, 16 * 1024 * 1024)  # not a frame of sane size
        self.assertIn(b"hello", worker.read_exact(6))

    def test_garbage_no_reply(self):
        worker = self.start("--test-commands")
        worker.send({"id": 1, "command": "garbage", "args": {"kind": "no_reply"}})
        with self.assertRaises(TimeoutError):
            worker.read_exact(1, timeout=0.3)
        self.assertEqual(worker.request("ping", request_id=2)["result"]["status"], "ok")  # keeps serving

    def test_garbage_unknown_kind(self):
        worker = self.start("--test-commands")
        self.assertIn("Unknown garbage kind", worker.error("garbage", {"kind": "confetti"}))

    def test_hang_then_sigterm(self):
        worker = self.start("--test-commands")
        worker.send({"id": 1, "command": "hang", "args": {}})
        with self.assertRaises(TimeoutError):
            worker.read_exact(1, timeout=0.3)
        worker.proc.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(), -signal.SIGTERM)

    def test_hang_after_reply_answers_then_stops_answering(self):
        worker = self.start("--test-commands")
        self.assertEqual(worker.ok("hang", {"after_reply": True}), {"hanging": True})
        worker.send({"id": 2, "command": "ping", "args": {}})  # an idle worker's next ping hangs
        with self.assertRaises(TimeoutError):
            worker.read_exact(1, timeout=0.3)
        self.assertIsNone(worker.proc.poll())
        worker.proc.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(), -signal.SIGTERM)

    def test_hang_after_reply_false_and_bad_arg(self):
        worker = self.start("--test-commands")
        self.assertEqual(worker.error("hang", {"after_reply": "yes"}), "after_reply must be a boolean")
        worker.send({"id": 7, "command": "hang", "args": {"after_reply": False}})
        with self.assertRaises(TimeoutError):
            worker.read_exact(1, timeout=0.3)
        worker.proc.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(), -signal.SIGTERM)

    def test_fail_pings(self):
        worker = self.start("--test-commands")
        self.assertEqual(worker.ok("fail_pings", {"count": 2}), {"failing_pings": 2})
        for _ in range(2):
            reply = worker.request("ping")
            self.assertIs(reply["success"], False)
            self.assertEqual(reply["error"], "ping failure injected")
        self.assertEqual(worker.ok("echo", {"x": 1})["x"], 1)  # other commands are not affected
        self.assertEqual(worker.ok("ping")["status"], "ok")  # the count is used up
        self.assertEqual(worker.ok("fail_pings", {"count": 1}), {"failing_pings": 1})
        self.assertEqual(worker.error("ping"), "ping failure injected")
        self.assertEqual(worker.ok("fail_pings", {"count": 0}), {"failing_pings": 0})
        self.assertEqual(worker.ok("ping")["status"], "ok")
        for bad in (-1, "2", True, 1.5):
            with self.subTest(count=bad):
                self.assertEqual(worker.error("fail_pings", {"count": bad}),
                                 "count must be a non-negative integer")
        self.assertEqual(worker.ok("get_stats")["error_count"], 7)  # failed pings are ordinary errors

    def test_stderr(self):
        worker = self.start("--test-commands")
        self.assertEqual(worker.ok("stderr", {"text": "boom line", "lines": 3}), {"lines": 3})
        self.assertEqual(worker.ok("stderr"), {"lines": 1})
        worker.close_stdin()
        self.assertEqual(worker.wait(), 0)
        lines = worker.stderr_text().splitlines()
        self.assertEqual(lines.count("boom line"), 3)
        self.assertEqual(lines.count("test stderr line"), 1)

    def test_alloc(self):
        worker = self.start("--test-commands")
        before = worker.ok("get_stats")["memory_usage"]["rss"]
        result = worker.ok("alloc", {"mb": 64})
        self.assertEqual((result["allocated_mb"], result["total_mb"]), (64, 64))
        self.assertGreaterEqual(result["rss"], before + 60 * 1024 * 1024)
        self.assertEqual(worker.ok("alloc", {"mb": 8})["total_mb"], 72)  # kept, not freed
        self.assertGreaterEqual(worker.ok("get_stats")["memory_usage"]["rss"], before + 68 * 1024 * 1024)


class TestInitTests(WorkerTestCase):
    def test_init_hang(self):
        worker = self.start("--test-commands", "--test-init", "hang", init=False)
        worker.send({"id": 0, "command": "ping", "args": {"initialization": True}})
        with self.assertRaises(TimeoutError):
            worker.read_exact(1, timeout=0.5)
        worker.proc.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(), -signal.SIGTERM)

    def test_init_exit(self):
        worker = self.start("--test-commands", "--test-init", "exit", init=False)
        self.assertEqual(worker.wait(), 3)
        worker.assert_eof()

    def test_init_traceback(self):
        worker = self.start("--test-commands", "--test-init", "traceback", init=False)
        self.assertEqual(worker.wait(), 1)
        worker.assert_eof()
        text = worker.stderr_text()
        self.assertIn("Traceback (most recent call last)", text)
        self.assertIn("RuntimeError: worker failed to start: test-init traceback", text)

    def test_init_error_then_serves(self):
        worker = self.start("--test-commands", "--test-init", "error", init=False)
        reply = worker.init()
        self.assertEqual((reply["id"], reply["success"], reply["error"]),
                         (0, False, "init refused (test-init error)"))
        self.assertEqual(worker.ok("ping")["status"], "ok")
        self.assertEqual(worker.ok("echo", {"x": 1})["x"], 1)

    def test_init_mode_ignored_without_test_commands(self):
        worker = self.start("--test-init", "exit", init=False)
        self.assertTrue(worker.init()["success"])
        self.assertEqual(worker.error("echo"), "Unknown command: echo")


if __name__ == "__main__":
    unittest.main()
