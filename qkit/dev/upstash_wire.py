"""The local Upstash endpoint's wire: its limits and refusals, the test knobs (:class:`FaultPlan`,
:class:`EndpointStats`), reply encoding (RESP2 values as Upstash's JSON, base64 on request) and request
parsing.  The app that serves them is :mod:`qkit.dev.upstash`.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from redis.exceptions import ResponseError


#: Upstash's Free/PAYG "max request size" (2025–2026); 1 MB in older docs.
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024

WRONGPASS = "WRONGPASS invalid or missing auth token"
MAX_REQUEST_SIZE = "ERR max request size exceeded"
EXECABORT = "EXECABORT Transaction discarded because of previous errors."

# Upstash REST does not serve these (§2.8).  On a pooled connection they would
# also block it (BLPOP…), or change its state for the next request (SELECT,
# AUTH, HELLO, CLIENT…), or break the reply stream (SUBSCRIBE, MONITOR).
REFUSED_COMMANDS = frozenset(
    """
    BLPOP BRPOP BRPOPLPUSH BLMOVE BLMPOP BZPOPMIN BZPOPMAX BZMPOP
    SUBSCRIBE PSUBSCRIBE SSUBSCRIBE UNSUBSCRIBE PUNSUBSCRIBE SUNSUBSCRIBE MONITOR
    MULTI EXEC DISCARD WATCH UNWATCH
    SELECT SWAPDB AUTH HELLO RESET QUIT CLIENT WAIT WAITAOF
    REPLICAOF SLAVEOF SYNC PSYNC REPLCONF FAILOVER SHUTDOWN
    READONLY READWRITE ASKING
    """.split()
)
# XREAD/XREADGROUP are fine unless they carry a BLOCK option.
BLOCK_OPTION_COMMANDS = frozenset({"XREAD", "XREADGROUP"})

#: what a :class:`FaultPlan` may do to one request
FAULT_ACTIONS = (
    "ok",               # behave normally
    "500_before",       # answer 500 with an HTML page (as a proxy would); the command does not run
    "500_json_before",  # answer 500 with a JSON error; the command does not run
    "500_after",        # run the command, then answer 500 with an HTML page
    "drop_before",      # close the connection before a complete answer; the command does not run
    "drop_after",       # run the command, then close the connection before a complete answer
    "timeout_after",    # run the command, then hang until the client gives up (or hang_seconds)
)

ROUTES = ("/", "/pipeline", "/multi-exec")


# --------------------------------------------------------------------------- test knobs
class FaultPlan:
    """A queue of per-request fault actions for the command routes.

    Each command request (``POST /``, ``/pipeline``, ``/multi-exec``) takes the
    next action in arrival order; once the queue is empty every request is
    answered normally.  Thread-safe, so a test thread can arm faults while the
    server thread serves.  ``fired`` records the actions taken, in order.
    """

    def __init__(self, actions: Iterable[str] = (), hang_seconds: float = 30.0) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[str] = collections.deque()
        self.hang_seconds = hang_seconds
        self.fired: list[str] = []
        self.arm(*actions)

    def arm(self, *actions: str) -> None:
        """Append actions (see :data:`FAULT_ACTIONS`) for the next requests."""
        for action in actions:
            if action not in FAULT_ACTIONS:
                raise ValueError(f"unknown fault action {action!r}; expected one of {FAULT_ACTIONS}")
        with self._lock:
            self._queue.extend(actions)

    def clear(self) -> None:
        """Forget pending actions and the history."""
        with self._lock:
            self._queue.clear()
            self.fired.clear()

    @property
    def pending(self) -> int:
        """How many armed actions have not been used yet."""
        with self._lock:
            return len(self._queue)

    def next_action(self) -> str:
        """Take the action for the request being served ("ok" when none is armed)."""
        with self._lock:
            action = self._queue.popleft() if self._queue else "ok"
            self.fired.append(action)
            return action


@dataclass
class EndpointStats:
    """Counters a test can read (and reset) while the endpoint serves."""

    requests: int = 0          # command requests received (POST /, /pipeline, /multi-exec)
    commands: int = 0          # commands sent on to Redis (MULTI/EXEC wrappers excluded)
    unauthorized: int = 0      # requests answered 401
    latency_sleeps: int = 0    # injected latency sleeps completed
    key_locking_scripts: int = 0  # EVAL/EVALSHA calls that carried Upstash's allow-key-locking shebang
    by_route: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        """Zero every counter."""
        self.requests = self.commands = self.unauthorized = self.latency_sleeps = self.key_locking_scripts = 0
        self.by_route.clear()


class RestError(Exception):
    """An answer with a JSON error body: raised anywhere, turned into a response once."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- reply encoding
def error_text(err: ResponseError) -> str:
    """Redis's full error text, with the code prefix redis-py strips off (``NOSCRIPT …``)."""
    code = getattr(err, "status_code", None)  # redis-py 8 keeps the stripped prefix here
    text = str(err)
    return f"{code} {text}" if code else text


def encode_reply(value: Any, b64: bool) -> Any:
    """Map a raw RESP2 reply (bytes/int/None/list) to Upstash's JSON value.

    Only strings, integers, null and arrays are emitted: the client's decoder
    raises on JSON floats and objects.  ``"OK"`` stays plain in base64 mode
    because the client special-cases it.
    """
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, bytes):
        if not b64:
            return value.decode("utf-8", "replace")  # Upstash replaces bad bytes with U+FFFD too
        return "OK" if value == b"OK" else base64.b64encode(value).decode("ascii")
    if isinstance(value, list):
        return [encode_reply(item, b64) for item in value]
    if isinstance(value, ResponseError):  # an error nested in a Lua table / EXEC reply
        return encode_reply(error_text(value).encode("utf-8"), b64)
    raise TypeError(f"unexpected reply type {type(value).__name__} (is the pool on protocol=2?)")


def reply_item(value: Any, b64: bool) -> dict[str, Any]:
    """One element of a /pipeline or /multi-exec answer."""
    if isinstance(value, ResponseError):
        return {"error": error_text(value)}
    return {"result": encode_reply(value, b64)}


# --------------------------------------------------------------------------- request parsing
def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON here")


def parse_body(body: bytes) -> Any:
    try:
        # Numbers keep the literal text the client sent ("2.5", "1e+21"), so
        # nothing is re-formatted on its way to Redis; NaN/Infinity are refused.
        return json.loads(body, parse_int=str, parse_float=str, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError):
        raise RestError(400, "ERR failed to parse the request body as JSON") from None


def as_command(value: Any) -> list[str]:
    """Validate one command array: a name, then string/number arguments."""
    if not isinstance(value, list) or not value:
        raise RestError(400, "ERR a command must be a non-empty JSON array")
    for arg in value:
        # parse_int/parse_float turned numbers into str already; bools, null,
        # objects and arrays are refused so qkit cannot come to rely on
        # Upstash's undocumented coercion of them.
        if not isinstance(arg, str):
            raise RestError(400, "ERR command arguments must be JSON strings or numbers")
    return value


#: Upstash's shebang (qkit.lua.KEY_LOCKING_SHEBANG without its newline) and what the endpoint sends Redis 7
#: instead: a bare shebang, which makes Redis apply its strict key checks (undeclared keys fail on a cluster)
KEY_LOCKING_FLAG_LINE = "#!lua flags=allow-key-locking"
BARE_SHEBANG = "#!lua"


class KeyLocking:
    """Accept Upstash's ``allow-key-locking`` script flag that Redis 7 refuses.

    ``EVAL`` of a flagged script is sent with a bare ``#!lua`` shebang instead, and the flagged text's SHA1
    is remembered against the rewritten one, so the client's ``EVALSHA`` of the flagged text finds the
    script Redis has cached (one command per call, as on Upstash).
    """

    def __init__(self) -> None:
        self.shas: dict[str, str] = {}

    def translate(self, command: list[str], stats: "EndpointStats") -> list[str]:
        name = command[0].upper() if command else ""
        if name == "EVAL" and len(command) > 1 and command[1].startswith(KEY_LOCKING_FLAG_LINE + "\n"):
            source = BARE_SHEBANG + command[1][len(KEY_LOCKING_FLAG_LINE):]
            self.shas[hashlib.sha1(command[1].encode()).hexdigest()] = hashlib.sha1(source.encode()).hexdigest()
            stats.key_locking_scripts += 1
            return [command[0], source, *command[2:]]
        if name == "EVALSHA" and len(command) > 1 and command[1].lower() in self.shas:
            stats.key_locking_scripts += 1
            return [command[0], self.shas[command[1].lower()], *command[2:]]
        return command


def refusal(command: Sequence[str]) -> str | None:
    """The error text for a command this endpoint will not run, else None."""
    name = command[0].upper()
    if name in REFUSED_COMMANDS or (
        name in BLOCK_OPTION_COMMANDS and any(a.upper() == "BLOCK" for a in command[1:])
    ):
        return f"ERR command is not available over REST: {name}"
    return None
