#!/usr/bin/env python3
"""The bundled DSPex worker: one Python process serving framed JSON requests.

Wire contract: /work/shared/spec/PROTOCOL.md (authoritative).  In short:

* requests arrive on stdin, replies leave on stdout; every message is a 4-byte
  unsigned big-endian length N followed by N bytes of UTF-8 JSON;
* nothing but reply frames is ever written to stdout (logging goes to stderr);
* one request at a time, in order; EOF on stdin at a frame boundary ends the
  worker with exit status 0.

Standard library only.  DSPy is optional: it is looked up lazily and used only
when configure_lm names a provider other than the built-in "mock" LM.

Command line:
    python3 dspex_worker.py [--mode pool-worker|standalone] [--worker-id ID]
                            [--max-frame-bytes N] [--max-json-depth N]
                            [--lm mock] [--test-commands] [--test-init MODE]

The runtime passes `--max-frame-bytes <pool.max_frame_bytes> --max-json-depth
<pool.max_json_depth>` to every worker; both are accepted in every mode.

* --max-frame-bytes N (default 16777216 = 16 MiB, at most 4294967295): the
  largest frame body in both directions.  A request frame announcing more is a
  protocol violation (exit 2); a reply that would be larger is replaced by an
  error reply "Reply too large: ..." to the same request.
* --max-json-depth N (default 128, 1..10000): nesting bound, counted as the
  runtime counts it (a scalar is 0 deep, `[]` and `{}` 1, `[[1]]` 2).
  - Requests: `args` may nest N levels, as the runtime allows its callers, so
    the whole request text (the envelope object adds one level) may nest N + 1.
    A deeper request is not decoded at all; it gets the ordinary error reply
    "Invalid request: JSON nested deeper than N levels ..." and the worker
    keeps serving.  Depth is measured on the bytes before decoding, without
    recursion: a frame with at most N + 1 bytes '[' or '{' (nearly every
    request) costs one C-speed pass; only a frame with more is scanned
    exactly ('[' and '{' outside strings, in bounded chunks).
  - Replies: the runtime treats a reply nested deeper than N as a protocol
    violation, so a result that would make one (or that cannot be encoded at
    all, e.g. RecursionError) is replaced by "Reply not encodable as JSON: ..."
    with the request's id.
  A RecursionError while decoding, handling or encoding is an error reply,
  never an exit.  When a request cannot be decoded (invalid UTF-8 or JSON, too
  deep), its id is recovered from the prefix `{"id":<digits>,` that the
  runtime always writes first; otherwise the reply has id 0.

Exit statuses: 0 on EOF or after `shutdown` (or when the runtime closed our
stdout), 1 on EOF inside a frame, 2 on an invalid frame header (zero length or
more than --max-frame-bytes) or an invalid command line, 3 for
`--test-init exit` (and `setting-exit`, in configure_lm).
"""

import argparse
import hashlib
import importlib.util
import itertools
import json
import keyword
import os
import re
import signal
import struct
import sys
import threading
import time
import traceback

MAX_FRAME_BYTES = 16 * 1024 * 1024  # default of --max-frame-bytes (pool.max_frame_bytes)
FRAME_BYTES_LIMIT = 0xFFFFFFFF  # what a 4-byte header can announce
MAX_JSON_DEPTH = 128  # default of --max-json-depth (pool.max_json_depth)
JSON_DEPTH_LIMIT = 10000  # the largest --max-json-depth accepted (the runtime caps at 1000)
DEFAULT_TEMPERATURE = 0.7
MIB = 1024 * 1024

_HEADER = struct.Struct(">I")
# Compact and C-accelerated: the ping path must stay cheap.
# allow_nan=False: never emit NaN/Infinity, which are not JSON.
_encode_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
# Canonical form used to derive deterministic mock outputs.
_canonical_json = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


class CommandError(Exception):
    """An ordinary failure of one request; its message goes to the caller verbatim."""


class FrameError(Exception):
    """The incoming stream broke the framing rules; the worker must exit."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


NO_REPLY = object()  # returned by a handler that already wrote (or must not write) a reply


# --------------------------------------------------------------------------- framing


class FrameChannel:
    """Reads request frames from one fd and writes reply frames to another."""

    def __init__(self, in_fd, out_fd, max_frame_bytes=MAX_FRAME_BYTES):
        # A buffered reader: one read() syscall usually brings header and body.
        self._reader = open(in_fd, "rb", buffering=64 * 1024, closefd=True)
        self._out_fd = out_fd
        self.max_frame_bytes = max_frame_bytes

    def _read_exact(self, n):
        """Read exactly n bytes; returns fewer only at EOF."""
        data = self._reader.read(n)
        if data is None:
            data = b""
        while len(data) < n:
            more = self._reader.read(n - len(data))
            if not more:
                break
            data += more
        return data

    def read_frame(self):
        """Return the next frame body, or None on EOF at a frame boundary."""
        header = self._read_exact(4)
        if not header:
            return None
        if len(header) < 4:
            raise FrameError(f"EOF inside a frame header ({len(header)} of 4 bytes)", 1)
        (length,) = _HEADER.unpack(header)
        if length == 0:
            raise FrameError("zero-length frame", 2)
        if length > self.max_frame_bytes:
            raise FrameError(
                f"frame of {length} bytes exceeds max_frame_bytes {self.max_frame_bytes}", 2
            )
        body = self._read_exact(length)
        if len(body) < length:
            raise FrameError(f"EOF inside a frame body ({len(body)} of {length} bytes)", 1)
        return body

    def close(self):
        self._reader.close()

    def write_raw(self, data):
        """Write all of data to the reply stream (no buffering, so no flush needed)."""
        view = memoryview(data)
        while view:
            written = os.write(self._out_fd, view)
            view = view[written:]

    def write_frame(self, body):
        self.write_raw(_HEADER.pack(len(body)) + body)


# --------------------------------------------------------------------------- JSON depth


_NOT_OPENERS = bytes(c for c in range(256) if c not in b"[{")  # translate(): keep only [ and {
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes
_DEPTH_CHUNK = 64 * 1024  # bounds the temporary objects of an exact scan
# The runtime writes every request as {"id":<digits>,... (encode_request); JSON whitespace tolerated.
_WS = rb"[ \t\n\r]*"  # JSON whitespace
_REQUEST_ID_PREFIX = re.compile(
    _WS + rb"\{" + _WS + rb'"id"' + _WS + rb":" + _WS + rb"(0|[1-9][0-9]{0,19})" + _WS + rb",")


def json_text_depth(text, limit=None):
    """Nesting depth of JSON text (bytes): '[' and '{' outside strings, escapes honoured.

    For well-formed JSON this is the runtime's json_text_depth.  No recursion
    and no per-byte Python loop: escape pairs are dropped, each chunk is split
    at '"' (every other piece is outside a string) and the brackets left are
    summed with itertools.accumulate.  Ill-formed text still gets a number
    (closers are not clamped at 0); it is never below the depth a decoder
    reaches before it rejects the text.  Like the runtime's, it stops once the
    depth exceeds limit and then returns limit + 1.
    """
    if b"\\" in text:
        # Backslashes only occur inside strings; pairing them from the left is
        # how a decoder reads escapes, so what is left of \" is not a delimiter.
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    depth = deepest = 0
    in_string = False
    for start in range(0, len(text), _DEPTH_CHUNK):
        pieces = text[start:start + _DEPTH_CHUNK].split(b'"')
        outside = b"".join(pieces[1 if in_string else 0::2])
        if len(pieces) % 2 == 0:  # an odd number of quotes in this chunk
            in_string = not in_string
        steps = outside.translate(_BRACKET_STEPS, _NOT_BRACKETS)
        if steps:
            deepest = max(deepest, max(itertools.accumulate(memoryview(steps).cast("b"), initial=depth)))
            depth += len(steps) - 2 * steps.count(b"\xff")
            if limit is not None and deepest > limit:
                return limit + 1
    return deepest


def json_deeper_than(text, limit):
    """True when JSON text (bytes) nests more than limit levels.

    The hot path: a text of at most limit bytes, or with at most limit bytes
    '[' or '{' anywhere, cannot be deeper (one C-speed pass, no allocation
    beyond the few openers); only other texts are scanned exactly.
    """
    if len(text) <= limit or len(text.translate(None, _NOT_OPENERS)) <= limit:
        return False
    return json_text_depth(text, limit) > limit


def request_id_of(body):
    """The id of a request that cannot be decoded, from its prefix {"id":<digits>, (else 0)."""
    match = _REQUEST_ID_PREFIX.match(body, 0, 64)
    if match is None:
        return 0
    request_id = int(match.group(1))
    return request_id if request_id <= 0xFFFFFFFFFFFFFFFF else 0


# --------------------------------------------------------------------------- signatures


def sanitize_identifier(name):
    """Turn a field name into a Python identifier.

    Characters outside [A-Za-z0-9_] become '_', a leading digit gets a '_'
    prefix and a keyword gets a '_' suffix: "2nd answer" -> "_2nd_answer",
    "class" -> "class_".
    """
    ident = re.sub(r"[^0-9A-Za-z_]", "_", name)
    if not ident or ident[0].isdigit():
        ident = "_" + ident
    if keyword.iskeyword(ident):
        ident += "_"
    return ident


def signature_class_name(signature):
    """A class-name string for a signature: CamelCase of its name, else a hash."""
    name = signature.get("name")
    if isinstance(name, str):
        name = name.split(".")[-1]
        parts = re.findall(r"[A-Za-z0-9]+", name)
        camel = "".join(part[:1].upper() + part[1:] for part in parts)
        if camel:
            if camel[0].isdigit():
                camel = "Signature" + camel
            if keyword.iskeyword(camel):
                camel += "_"
            return camel
    digest = hashlib.sha256(_canonical_json(signature).encode("utf-8")).hexdigest()
    return "DynamicSignature_" + digest[:8]


class Field:
    __slots__ = ("name", "ident", "description", "type")

    def __init__(self, name, ident, description, type_):
        self.name = name  # as the caller spelled it (keys of inputs / outputs)
        self.ident = ident  # sanitised Python identifier
        self.description = description
        self.type = type_  # normalised: str, int, float, bool, list, dict


_TYPE_ALIASES = {
    "str": "str", "string": "str", "text": "str",
    "int": "int", "integer": "int",
    "float": "float", "number": "float",
    "bool": "bool", "boolean": "bool",
    "list": "list", "array": "list",
    "dict": "dict", "object": "dict",
}


def normalize_type(type_):
    """Map a declared field type to one of the mock LM's kinds (unknown -> str)."""
    if type_ is None:
        return "str"
    if not isinstance(type_, str):
        raise CommandError(f"Field type must be a string, got {type(type_).__name__}")
    key = type_.strip().lower()
    if key in _TYPE_ALIASES:
        return _TYPE_ALIASES[key]
    for prefix, kind in (("list", "list"), ("dict", "dict")):  # e.g. "list[str]"
        if key.startswith(prefix + "["):
            return kind
    return "str"


class Signature:
    """A validated signature definition with sanitised field names."""

    def __init__(self, definition):
        if not isinstance(definition, dict):
            raise CommandError("signature must be an object")
        self.definition = definition
        self.inputs = self._fields(definition, "inputs", required=False)
        self.outputs = self._fields(definition, "outputs", required=True)
        self.field_mapping = {}
        used = set()
        for field in self.inputs + self.outputs:
            if field.name in self.field_mapping:
                raise CommandError(f"Duplicate field name in signature: {field.name}")
            ident, n = field.ident, 2
            while ident in used:  # "a-b" and "a_b" both sanitise to "a_b"
                ident, n = f"{field.ident}_{n}", n + 1
            field.ident = ident
            used.add(ident)
            self.field_mapping[field.name] = ident
        self.class_name = signature_class_name(definition)

    @staticmethod
    def _fields(definition, key, required):
        raw = definition.get(key)
        if raw is None and not required:
            return []
        if not isinstance(raw, list):
            raise CommandError(f"signature.{key} must be a list of field objects")
        if required and not raw:
            raise CommandError(f"signature.{key} must not be empty")
        fields = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise CommandError(f"signature.{key}[{i}] must be an object")
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise CommandError(f"signature.{key}[{i}].name must be a non-empty string")
            description = item.get("description", "")
            fields.append(Field(name, sanitize_identifier(name), description, normalize_type(item.get("type"))))
        return fields


# --------------------------------------------------------------------------- programs


class Program:
    """One created program, cached per (session_id, program_id)."""

    def __init__(self, program_id, session_id, signature, program_type):
        self.program_id = program_id
        self.session_id = session_id
        self.signature = signature
        self.program_type = program_type
        self.created_at = time.time()
        self.execution_count = 0
        self.last_executed = None
        self.fallback_used = False
        self.dspy_module = None  # built on first use by a DSPy LM

    @classmethod
    def from_definition(cls, definition, session_id, program_id=None):
        """Build a program from create_program-style args (also used for program_data)."""
        if not isinstance(definition, dict):
            raise CommandError("program definition must be an object")
        given_id = definition.get("id", definition.get("program_id"))
        if program_id is None:
            program_id = given_id
        elif given_id is not None and given_id != program_id:
            raise CommandError(f"program_data id {given_id} does not match program_id {program_id}")
        check_program_id(program_id, "id")
        if "signature" not in definition:
            raise CommandError("Missing required argument: signature")
        program_type = definition.get("program_type", "predict")
        if not isinstance(program_type, str) or not program_type:
            raise CommandError("program_type must be a non-empty string")
        return cls(program_id, session_id, Signature(definition["signature"]), program_type)

    def summary(self):
        return {
            "id": self.program_id,
            "created_at": self.created_at,
            "execution_count": self.execution_count,
            "last_executed": self.last_executed,
            "signature": self.signature.definition,
            "session_id": self.session_id,
        }

    def info(self):
        return {
            "program_id": self.program_id,
            "signature": self.signature.definition,
            "created_at": self.created_at,
            "execution_count": self.execution_count,
            "last_executed": self.last_executed,
        }


def check_program_id(program_id, arg_name="program_id"):
    if program_id is None:
        raise CommandError(f"Missing required argument: {arg_name}")
    if not isinstance(program_id, str) or not program_id:
        raise CommandError(f"{arg_name} must be a non-empty string")


# --------------------------------------------------------------------------- language models


class MockLM:
    """Deterministic offline LM: outputs depend only on program id, field and inputs."""

    provider = "mock"
    has_api_key = False

    def __init__(self, model="mock", temperature=DEFAULT_TEMPERATURE):
        self.model = model
        self.temperature = temperature

    def describe(self):
        return f"{self.provider}/{self.model}"

    def run(self, program, inputs):
        return mock_outputs(program.program_id, program.signature.outputs, inputs)


def mock_value(program_id, field_name, kind, inputs):
    """The mock value of one output field (sha256-based; no randomness, no hash())."""
    seed = _canonical_json({"program": program_id, "field": field_name, "inputs": inputs})
    digest = hashlib.sha256(seed.encode("utf-8")).digest()
    hex_ = digest.hex()
    if kind == "int":
        return int.from_bytes(digest[:4], "big") % 1000
    if kind == "float":
        return round(int.from_bytes(digest[4:8], "big") / 2**32, 6)
    if kind == "bool":
        return bool(digest[8] & 1)
    if kind == "list":
        return [f"mock {field_name} {i} {hex_[8 * i:8 * i + 8]}" for i in range(3)]
    if kind == "dict":
        return {"field": field_name, "value": f"mock {field_name} {hex_[:8]}", "hash": hex_[:16]}
    return f"mock {field_name} {hex_[:8]}"


def mock_outputs(program_id, output_fields, inputs):
    """Mock values for every output field, keyed by the caller's field names."""
    return {f.name: mock_value(program_id, f.name, f.type, inputs) for f in output_fields}


def dspy_installed():
    """True when the dspy package can be found (without paying for importing it)."""
    try:
        return importlib.util.find_spec("dspy") is not None
    except (ImportError, ValueError):
        return False


class DSPyLM:
    """A real LM through DSPy (only when dspy is importable)."""

    def __init__(self, provider, model, temperature, api_key):
        import dspy  # deferred: importing dspy takes seconds

        self.dspy = dspy
        self.provider = provider
        self.model = model
        self.temperature = temperature
        kwargs = {"temperature": temperature}
        if api_key:
            kwargs["api_key"] = api_key
        self.lm = dspy.LM(f"{provider}/{model}", **kwargs)
        dspy.settings.configure(lm=self.lm)

    def describe(self):
        return f"{self.provider}/{self.model}"

    def _module(self, program):
        if program.dspy_module is None:
            dspy, sig = self.dspy, program.signature
            try:
                attrs = {"__doc__": sig.definition.get("description") or "A dynamically built signature.",
                         "__annotations__": {}}
                for field in sig.inputs:
                    attrs[field.ident] = dspy.InputField(desc=field.description or "")
                    attrs["__annotations__"][field.ident] = str
                for field in sig.outputs:
                    attrs[field.ident] = dspy.OutputField(desc=field.description or "")
                    attrs["__annotations__"][field.ident] = str
                signature_cls = type(sig.class_name, (dspy.Signature,), attrs)
            except Exception:  # fall back to DSPy's string form "a, b -> c"
                program.fallback_used = True
                signature_cls = "{} -> {}".format(", ".join(f.ident for f in sig.inputs),
                                                  ", ".join(f.ident for f in sig.outputs))
            if program.program_type == "chain_of_thought":
                program.dspy_module = dspy.ChainOfThought(signature_cls)
            else:
                program.dspy_module = dspy.Predict(signature_cls)
        return program.dspy_module

    def run(self, program, inputs):
        module = self._module(program)
        kwargs = {f.ident: inputs[f.name] for f in program.signature.inputs}
        prediction = module(**kwargs)
        return {f.name: getattr(prediction, f.ident, None) for f in program.signature.outputs}


# --------------------------------------------------------------------------- the worker


class Worker:
    def __init__(self, worker_id, mode, channel, test_commands=False, test_init=None, lm=None,
                 max_json_depth=MAX_JSON_DEPTH):
        self.worker_id = worker_id
        self.mode = mode
        self.channel = channel
        self.max_json_depth = max_json_depth  # of args and of a whole reply (see the module docstring)
        self.test_init = test_init if test_commands else None
        self.lm = lm
        self.programs = {}  # (session_id, program_id) -> Program
        self.command_count = 0
        self.error_count = 0
        self.started = time.time()
        self.stopping = False
        self._dspy_available = None
        self._request_id = 0
        self._ballast = []  # memory kept alive by the test command `alloc`
        self._session_lms = {}  # lm_override spec (JSON text) -> LM
        self._failing_pings = 0  # set by the test command `fail_pings`

        self.handlers = {
            "ping": self.cmd_ping,
            "configure_lm": self.cmd_configure_lm,
            "create_program": self.cmd_create_program,
            "execute_program": self.cmd_execute_program,
            "list_programs": self.cmd_list_programs,
            "delete_program": self.cmd_delete_program,
            "get_program_info": self.cmd_get_program_info,
            "get_stats": self.cmd_get_stats,
            "cleanup": self.cmd_cleanup,
            "reset_state": self.cmd_reset_state,
            "cleanup_session": self.cmd_cleanup_session,
            "shutdown": self.cmd_shutdown,
        }
        if test_commands:
            self.handlers.update({
                "echo": self.test_echo,
                "sleep": self.test_sleep,
                "crash": self.test_crash,
                "garbage": self.test_garbage,
                "hang": self.test_hang,
                "stderr": self.test_stderr,
                "alloc": self.test_alloc,
                "fail_pings": self.test_fail_pings,
            })

    # ---- plumbing

    def log(self, message):
        try:
            sys.stderr.write(f"[{self.worker_id}] {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    @property
    def dspy_available(self):
        if self._dspy_available is None:
            self._dspy_available = dspy_installed()
        return self._dspy_available

    def lm_description(self):
        return self.lm.describe() if self.lm is not None else None

    def serve(self):
        """Serve requests until EOF or shutdown; returns the exit status."""
        while not self.stopping:
            try:
                body = self.channel.read_frame()
            except FrameError as e:
                self.log(f"protocol violation on stdin: {e}")
                return e.exit_code
            if body is None:
                self.log("stdin closed, exiting")
                return 0
            reply = self.handle_frame(body)
            if reply is not None:
                self.send(reply)
        return 0

    def send(self, reply):
        try:
            body = _encode_json(reply).encode("utf-8")
            error = None
            if len(body) > self.channel.max_frame_bytes:
                error = f"Reply too large: {len(body)} bytes exceeds {self.channel.max_frame_bytes}"
            elif json_deeper_than(body, self.max_json_depth):
                # The runtime would take this reply for a protocol violation and drop the worker.
                error = f"Reply not encodable as JSON: nested deeper than {self.max_json_depth} levels"
        except (TypeError, ValueError) as e:  # e.g. an LM output that is not JSON-serialisable
            error = f"Reply not encodable as JSON: {e}"
        except RecursionError as e:  # a result nested too deep for the encoder
            error = f"Reply not encodable as JSON: nested too deep ({e})"
        if error is not None:
            self.log(error)
            self.error_count += 1
            try:
                body = _encode_json({"id": reply.get("id", 0), "success": False, "error": error,
                                     "timestamp": time.time()}).encode("utf-8")
            except (TypeError, ValueError, RecursionError):  # an id that is itself not encodable
                body = _encode_json({"id": 0, "success": False, "error": error,
                                     "timestamp": time.time()}).encode("utf-8")
        self.channel.write_frame(body)

    def invalid_request(self, body, message):
        """The error reply to a request that cannot be decoded (its id from its prefix, else 0)."""
        self.command_count += 1
        self.error_count += 1
        self.log(f"invalid request of {len(body)} bytes: {message}")
        return {"id": request_id_of(body), "success": False, "error": message, "timestamp": time.time()}

    def handle_frame(self, body):
        """Decode one request and run it; returns the reply object (or None)."""
        # args may nest max_json_depth levels; the request object around them adds one.
        if json_deeper_than(body, self.max_json_depth + 1):
            return self.invalid_request(
                body, f"Invalid request: JSON nested deeper than {self.max_json_depth} levels "
                      f"(args, as counted for --max-json-depth / pool.max_json_depth)")
        try:
            request = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return self.invalid_request(body, f"Invalid JSON: {e}")
        except RecursionError as e:  # not expected within the depth bound; never an exit
            return self.invalid_request(body, f"Invalid request: JSON nested too deep to decode ({e})")
        if not isinstance(request, dict):
            self.command_count += 1
            self.error_count += 1
            return {"id": 0, "success": False, "error": "Invalid request: not a JSON object",
                    "timestamp": time.time()}
        return self.handle_request(request)

    def handle_request(self, request):
        request_id = request.get("id", 0)
        self._request_id = request_id
        self.command_count += 1
        command = request.get("command")
        args = request.get("args")
        if args is None:
            args = {}
        try:
            if not isinstance(args, dict):
                raise CommandError("Invalid request: args must be an object")
            if self.test_init == "error" and request_id == 0:
                self.test_init = None  # refuse the init ping once, then serve normally
                raise CommandError("init refused (test-init error)")
            handler = self.handlers.get(command) if isinstance(command, str) else None
            if handler is None:
                raise CommandError(f"Unknown command: {command}")
            result = handler(args)
            if result is NO_REPLY:
                return None
            return {"id": request_id, "success": True, "result": result, "timestamp": time.time()}
        except CommandError as e:
            message = str(e)
        except Exception as e:  # a bug or an environment failure: report it, keep serving
            message = f"{type(e).__name__}: {e}"
            self.log(f"command {command!r} failed:\n{traceback.format_exc().rstrip()}")
        self.error_count += 1
        return {"id": request_id, "success": False, "error": message, "timestamp": time.time()}

    @staticmethod
    def session_of(args):
        session_id = args.get("session_id")
        if session_id is None:
            return "anonymous"
        return session_id if isinstance(session_id, str) else str(session_id)

    def find_program(self, args):
        program_id = args.get("program_id")
        check_program_id(program_id)
        program = self.programs.get((self.session_of(args), program_id))
        if program is None:
            raise CommandError(f"Program not found: {program_id}")
        return program

    def memory_usage(self):
        try:
            with open("/proc/self/statm", "rb") as f:
                pages = int(f.read().split()[1])
            return {"rss": pages * os.sysconf("SC_PAGE_SIZE")}
        except (OSError, ValueError, IndexError):
            import resource  # peak RSS; KiB on Linux

            return {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    # ---- commands

    def cmd_ping(self, args):
        if self._failing_pings > 0:  # only ever set by the test command `fail_pings`
            self._failing_pings -= 1
            raise CommandError("ping failure injected")
        now = time.time()
        return {
            "status": "ok",
            "worker_id": self.worker_id,
            "mode": self.mode,
            "uptime": now - self.started,
            "dspy_available": self.dspy_available,
            "lm": self.lm.describe() if self.lm is not None else None,
            "timestamp": now,
        }

    def cmd_configure_lm(self, args):
        if self.test_init == "setting-exit":
            self.log("test-init setting-exit: exiting with status 3 in configure_lm")
            os._exit(3)
        lm = self.make_lm(args)
        self.lm = lm
        self.log(f"LM configured: {lm.describe()} (temperature {lm.temperature})")
        return {"status": "configured", "provider": lm.provider, "model": lm.model,
                "temperature": lm.temperature, "has_key": lm.has_api_key}

    def session_lm(self, spec):
        """The LM of a session's override (`lm_override` in execute_program), built once per spec."""
        if not isinstance(spec, dict):
            raise CommandError("lm_override must be an object")
        key = json.dumps(spec, sort_keys=True)
        lm = self._session_lms.get(key)
        if lm is None:
            lm = self.make_lm(spec)
            if len(self._session_lms) >= 64:
                self._session_lms.clear()
            self._session_lms[key] = lm
        return lm

    def make_lm(self, args):
        provider = args.get("provider")
        if not isinstance(provider, str) or not provider:
            raise CommandError("Missing required argument: provider")
        temperature = args.get("temperature", DEFAULT_TEMPERATURE)
        if temperature is None:
            temperature = DEFAULT_TEMPERATURE
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise CommandError("temperature must be a number")
        temperature = float(temperature)
        model = args.get("model")
        if model is not None and not isinstance(model, str):
            raise CommandError("model must be a string")
        api_key = self.api_key_of(args)
        if provider == "mock":
            lm = MockLM(model or "mock", temperature)
        else:
            if not model:
                raise CommandError(f"Missing required argument: model (provider {provider})")
            if not self.dspy_available:
                raise CommandError(f"DSPy is not available: cannot configure provider {provider}")
            lm = DSPyLM(provider, model, temperature, api_key)
        lm.has_api_key = bool(api_key)
        return lm

    @staticmethod
    def api_key_of(args):
        """The LM's key: `api_key` itself, or read from the environment variable `api_key_env` names
        (the runtime's lm.api_key_env: only the name travels). Never logged, never in a reply."""
        name = args.get("api_key_env")
        if name is None:
            return args.get("api_key")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise CommandError("api_key_env must name an environment variable")
        key = os.environ.get(name)
        if not key:
            raise CommandError(f"the environment variable {name} (api_key_env) is not set")
        return key

    def cmd_create_program(self, args):
        session_id = self.session_of(args)
        program = Program.from_definition(args, session_id)
        key = (session_id, program.program_id)
        if key in self.programs:
            raise CommandError(f"Program already exists: {program.program_id}")
        self.programs[key] = program
        sig = program.signature
        return {
            "program_id": program.program_id,
            "status": "created",
            "signature": sig.definition,
            "program_type": program.program_type,
            "signature_class": sig.class_name,
            "field_mapping": dict(sig.field_mapping),
            "fallback_used": program.fallback_used,
            "signature_def": sig.definition,
        }

    def cmd_execute_program(self, args):
        session_id = self.session_of(args)
        program_id = args.get("program_id")
        check_program_id(program_id)
        program = self.programs.get((session_id, program_id))
        program_data = args.get("program_data")
        if program_data is not None:
            # The definition the caller carries wins over a cached copy: a
            # program re-created elsewhere with another signature must not run
            # its stale version here.
            wanted = Program.from_definition(program_data, session_id, program_id)
            if (program is None or program.signature.definition != wanted.signature.definition
                    or program.program_type != wanted.program_type):
                program = wanted
                self.programs[(session_id, program_id)] = program
        if program is None:
            raise CommandError(f"Program not found: {program_id}")
        # A session's own LM (its configure_lm override) travels with each
        # execution, so it holds on whichever worker serves the session.
        lm = self.session_lm(args["lm_override"]) if args.get("lm_override") is not None else self.lm
        if lm is None:
            raise CommandError("No LM is loaded.")
        inputs = args.get("inputs")
        if inputs is None:
            inputs = {}
        if not isinstance(inputs, dict):
            raise CommandError("inputs must be an object")
        values = {}
        for field in program.signature.inputs:
            if field.name in inputs:
                values[field.name] = inputs[field.name]
            elif field.ident in inputs:
                values[field.name] = inputs[field.ident]
            else:
                raise CommandError(f"Missing required input field: {field.name}")
        outputs = lm.run(program, values)
        program.execution_count += 1
        program.last_executed = time.time()
        # execution_time is epoch seconds at completion, as in the original bridge.
        return {"program_id": program_id, "outputs": outputs, "execution_time": program.last_executed,
                "lm": lm.describe()}

    def cmd_list_programs(self, args):
        session_id = self.session_of(args)
        programs = [p.summary() for (sid, _), p in self.programs.items() if sid == session_id]
        return {"programs": programs, "total_count": len(programs)}

    def cmd_delete_program(self, args):
        program = self.find_program(args)
        del self.programs[(program.session_id, program.program_id)]
        return {"program_id": program.program_id, "status": "deleted"}

    def cmd_get_program_info(self, args):
        return self.find_program(args).info()

    def cmd_get_stats(self, args):
        return {
            "programs_count": len(self.programs),
            "command_count": self.command_count,
            "error_count": self.error_count,
            "uptime": time.time() - self.started,
            "memory_usage": self.memory_usage(),
            "dspy_available": self.dspy_available,
            "lm": self.lm_description(),
            "lm_has_key": bool(self.lm is not None and self.lm.has_api_key),
        }

    def cmd_cleanup(self, args):
        removed = len(self.programs)
        self.programs.clear()
        return {"status": "cleaned", "programs_removed": removed}

    def cmd_reset_state(self, args):
        result = {
            "status": "reset",
            "programs_cleared": len(self.programs),
            "commands_reset": self.command_count,  # includes this reset_state request
            "errors_reset": self.error_count,
        }
        self.programs.clear()
        self.command_count = 0
        self.error_count = 0
        return result

    def cmd_cleanup_session(self, args):
        session_id = self.session_of(args)
        keys = [key for key in self.programs if key[0] == session_id]
        for key in keys:
            del self.programs[key]
        return {"status": "cleaned", "session_id": session_id, "programs_removed": len(keys)}

    def cmd_shutdown(self, args):
        self.log("shutdown requested")
        self.stopping = True  # serve() sends this reply, then returns 0
        return {"status": "shutting_down", "worker_id": self.worker_id}

    # ---- test-only commands (only with --test-commands)

    def test_echo(self, args):
        return args

    def test_sleep(self, args):
        ms = args.get("ms", 0)
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or ms < 0:
            raise CommandError("ms must be a non-negative number")
        until_file = args.get("until_file")
        if until_file is None:
            time.sleep(ms / 1000.0)
            return {"slept_ms": ms}
        # A gate for tests: busy until the caller creates the file (ms bounds
        # it), so "still busy" never rests on a sleep outlasting the machine.
        if not isinstance(until_file, str) or not until_file:
            raise CommandError("until_file must be a non-empty string")
        deadline = time.monotonic() + ms / 1000.0
        while not os.path.exists(until_file):
            if time.monotonic() >= deadline:
                return {"slept_ms": ms, "released": False}
            time.sleep(0.002)
        return {"slept_ms": ms, "released": True}

    def test_crash(self, args):
        code = args.get("code", 1)
        when = args.get("when", "before_reply")
        if isinstance(code, bool) or not isinstance(code, int):
            raise CommandError("code must be an integer")
        if when not in ("before_reply", "mid_frame"):
            raise CommandError(f"Unknown crash point: {when}")
        self.log(f"crashing on request (code={code}, when={when})")
        if when == "mid_frame":
            # A header announcing 100 bytes, followed by only 10 of them.
            self.channel.write_raw(_HEADER.pack(100) + b'{"id":1,"s')
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)

    def test_garbage(self, args):
        kind = args.get("kind")
        if kind == "bad_json":
            self.channel.write_frame(b"this is not json {")
        elif kind == "wrong_id":
            wrong = self._request_id + 1000 if isinstance(self._request_id, int) else 1000
            self.send({"id": wrong, "success": True, "result": {"garbage": "wrong_id"},
                       "timestamp": time.time()})
        elif kind == "oversize_header":
            self.channel.write_raw(_HEADER.pack(0xFFFFFFF0))
        elif kind == "noise":
            # The first 4 bytes read as a length of 0xFFFF7878: no sane frame.
            self.channel.write_raw(b"\xff\xffxx" + b"hello\n" * 8)
        elif kind == "no_reply":
            pass
        else:
            raise CommandError(f"Unknown garbage kind: {kind}")
        return NO_REPLY

    def test_hang(self, args):
        after_reply = args.get("after_reply", False)
        if not isinstance(after_reply, bool):
            raise CommandError("after_reply must be a boolean")
        if after_reply:
            # Answer this request, then stop answering anything: an idle worker
            # that hangs, so the next request (e.g. a health ping) gets no reply.
            self.send({"id": self._request_id, "success": True, "result": {"hanging": True},
                       "timestamp": time.time()})
            self.log("hanging after the reply (never answers again)")
        else:
            self.log("hanging on request (never replies)")
        threading.Event().wait()  # SIGTERM (default action) still ends the process

    def test_fail_pings(self, args):
        count = args.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise CommandError("count must be a non-negative integer")
        self._failing_pings = count
        return {"failing_pings": count}

    def test_stderr(self, args):
        text = args.get("text", "test stderr line")
        lines = args.get("lines", 1)
        if isinstance(lines, bool) or not isinstance(lines, int) or lines < 0:
            raise CommandError("lines must be a non-negative integer")
        for _ in range(lines):
            sys.stderr.write(f"{text}\n")
        sys.stderr.flush()
        return {"lines": lines}

    def test_alloc(self, args):
        mb = args.get("mb", 0)
        if isinstance(mb, bool) or not isinstance(mb, int) or mb < 0:
            raise CommandError("mb must be a non-negative integer")
        # Multiplying a bytes object writes every byte, so the pages are really resident.
        self._ballast.append(b"\x01" * (mb * MIB))
        total = sum(len(b) for b in self._ballast) // MIB
        return {"allocated_mb": mb, "total_mb": total, "rss": self.memory_usage()["rss"]}


# --------------------------------------------------------------------------- process setup


def parse_args(argv):
    parser = argparse.ArgumentParser(description="DSPex worker: framed JSON over stdin/stdout.")
    parser.add_argument("--mode", choices=("pool-worker", "standalone"), default="standalone")
    parser.add_argument("--worker-id", default=None, help='default: "standalone-<pid>"')
    parser.add_argument("--lm", choices=("mock", "none"), default="none",
                        help="pre-configure an LM at start (default: none; the runtime sends configure_lm)")
    parser.add_argument("--test-commands", action="store_true",
                        help="enable the test-only commands: echo, sleep {ms}, crash {code, when}, "
                             "garbage {kind}, hang {after_reply} (never reply, or reply then never "
                             "answer again), stderr {text, lines}, alloc {mb}, fail_pings {count} "
                             "(the next count pings fail)")
    parser.add_argument("--test-init", choices=("hang", "exit", "traceback", "error", "setting-exit"),
                        default=None,
                        help="make the start fail (only with --test-commands); setting-exit: answer the "
                             "init ping, then exit with status 3 in configure_lm")
    parser.add_argument("--max-frame-bytes", type=bounded_int(1, FRAME_BYTES_LIMIT), default=MAX_FRAME_BYTES,
                        metavar="N",
                        help=f"largest frame body in both directions (1..{FRAME_BYTES_LIMIT}, default "
                             f"{MAX_FRAME_BYTES}; the runtime passes pool.max_frame_bytes): a larger request "
                             "frame is a protocol violation (exit 2), a larger reply becomes the error reply "
                             "'Reply too large'")
    parser.add_argument("--max-json-depth", type=bounded_int(1, JSON_DEPTH_LIMIT), default=MAX_JSON_DEPTH,
                        metavar="N",
                        help=f"deepest JSON nesting (1..{JSON_DEPTH_LIMIT}, default {MAX_JSON_DEPTH}; the "
                             "runtime passes pool.max_json_depth): a request whose args nest deeper gets the "
                             "error reply 'Invalid request: JSON nested deeper than N levels', a reply nested "
                             "deeper becomes 'Reply not encodable as JSON'; the worker keeps serving")
    return parser.parse_args(argv)


def bounded_int(low, high):
    """An argparse type: an integer in [low, high]."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high} (got {value})")
        return value

    return parse


def reset_signals():
    """Default SIGTERM/SIGPIPE actions, even if the parent left them ignored or blocked."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    except (AttributeError, OSError):
        pass
    # SIGPIPE stays ignored (Python's default): a closed stdout raises BrokenPipeError,
    # which main() turns into a quiet exit.


def claim_stdio():
    """Take stdin/stdout for the protocol and point fds 0/1 elsewhere.

    Stray output from any library (print, C code writing to fd 1) then lands
    on stderr instead of corrupting the framed stream.
    """
    in_fd = os.dup(0)
    out_fd = os.dup(1)  # os.dup gives non-inheritable fds
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return in_fd, out_fd


def main(argv=None):
    options = parse_args(sys.argv[1:] if argv is None else argv)
    worker_id = options.worker_id or f"standalone-{os.getpid()}"
    test_init = options.test_init if options.test_commands else None
    reset_signals()

    def log(message):
        sys.stderr.write(f"[{worker_id}] {message}\n")
        sys.stderr.flush()

    if options.test_init and not options.test_commands:
        log(f"--test-init {options.test_init} ignored (needs --test-commands)")

    if test_init == "exit":
        log("test-init exit: exiting with status 3 before reading")
        return 3
    if test_init == "traceback":
        raise RuntimeError("worker failed to start: test-init traceback")
    if test_init == "hang":
        log("test-init hang: never answering")
        threading.Event().wait()

    # Room for the deepest request and its reply in the C JSON codec, which
    # counts against the recursion limit (Python 3.11: 1000 by default).
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 2 * options.max_json_depth + 100))
    in_fd, out_fd = claim_stdio()
    channel = FrameChannel(in_fd, out_fd, max_frame_bytes=options.max_frame_bytes)
    lm = MockLM() if options.lm == "mock" else None
    worker = Worker(worker_id, options.mode, channel, test_commands=options.test_commands,
                    test_init=test_init, lm=lm, max_json_depth=options.max_json_depth)
    log(f"started (mode={options.mode}, pid={os.getpid()}"
        f"{', lm=' + lm.describe() if lm else ''}{', test-commands' if options.test_commands else ''})")
    try:
        return worker.serve()
    except BrokenPipeError:
        worker.log("stdout closed by the runtime, exiting")
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
