"""Retry policies for the what-if simulation (:mod:`qkit.analysis.whatif`): what a policy is, its
delays, and parsing one from text (``"full_jitter 1s..30s x5"``, ``"exponential(base=1, cap=30, attempts=5)"``
or ``"current"``, the queue's own back-off)."""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

from qkit.engine.backoff import Backoff, unit_hash

KINDS = ("immediate", "fixed", "linear", "exponential", "full_jitter", "equal_jitter", "decorrelated")
#: the policies the backoff_whatif notebook compares by default
DEFAULT_POLICIES = [
    "current",
    "fixed 1s x1",
    "immediate x3",
    "fixed 1s x3",
    "exponential 1s..30s x5",
    "full_jitter 1s..30s x5",
    "decorrelated 1s..30s x5",
    "full_jitter 2s..300s x10",
]


@dataclass(frozen=True)
class Policy:
    """A retry policy: how long to wait after failed attempt n, and how many attempts in all.

    ``kind``: ``immediate`` (0), ``fixed`` (base), ``linear`` (base·n),
    ``exponential`` (base·2^(n-1)), ``full_jitter`` (uniform in
    [0, base·2^(n-1)], qkit's own), ``equal_jitter`` (half that plus a
    uniform half), ``decorrelated`` (uniform in [base, 3·previous delay]).
    Every delay is capped at ``cap`` seconds.  ``max_attempts`` None keeps
    each job's own ``max_attempts``.
    """

    kind: str
    base: float = 1.0
    cap: float = 300.0
    max_attempts: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown policy kind {self.kind!r}; use one of {', '.join(KINDS)}")
        for what in ("base", "cap"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise ValueError(f"{self.kind}: {what} must be a number of seconds >= 0 (got {v!r})")
        m = self.max_attempts
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 100):
            raise ValueError(f"{self.kind}: max_attempts must be an integer 1..100 or None (got {m!r})")
        if not self.name:
            object.__setattr__(self, "name", self.describe())

    def describe(self) -> str:
        """The policy in the compact syntax :func:`parse_policy` reads (``exponential 1s..30s x5``)."""
        if self.kind == "immediate":
            delays = ""
        elif self.kind == "fixed" and self.cap >= self.base:
            delays = f" {self.base:g}s"
        else:
            delays = f" {self.base:g}s..{self.cap:g}s"
        return f"{self.kind}{delays}" + (f" x{self.max_attempts}" if self.max_attempts else "")

    def ceiling(self, attempt: int) -> float:
        """The exponential envelope ``min(cap, base·2^(n-1))`` after failed attempt ``attempt``."""
        return Backoff(self.base, self.cap).ceiling(attempt)

    def delay(self, job_id: int, epoch: int, attempt: int, previous: float = 0.0) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based); ``previous`` is the last delay."""
        k = self.kind
        if k == "immediate":
            return 0.0
        if k == "fixed":
            return min(self.cap, self.base)
        if k == "linear":
            return min(self.cap, self.base * attempt)
        if k == "exponential":
            return self.ceiling(attempt)
        if k == "full_jitter":
            # qkit's own rule: "current" reproduces the recorded delays
            return Backoff(self.base, self.cap).delay(job_id, epoch, attempt)
        if k == "equal_jitter":
            c = self.ceiling(attempt)
            return c / 2 + unit_hash("backoff", job_id, epoch, attempt) * c / 2
        # decorrelated jitter (AWS architecture blog): uniform in [base, 3 * previous], capped
        high = max(self.base, 3 * (previous if attempt > 1 else self.base))
        return min(self.cap, self.base + unit_hash("decorrelated", job_id, epoch, attempt) * (high - self.base))


def current_policy(base: float, cap: float) -> Policy:
    """qkit's own policy (full jitter) with the queue's back-off settings and each job's max_attempts."""
    return Policy("full_jitter", base=float(base), cap=float(cap), max_attempts=None, name="current")


def _number(node: ast.AST, text: str) -> Any:
    try:
        value = ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"policy {text!r}: arguments must be numbers or None") from None
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"policy {text!r}: arguments must be numbers or None")
    return value


_SECONDS = re.compile(r"(?P<v>\d+(?:\.\d*)?|\.\d+)(?P<unit>ms|s)?")


def _seconds(token: str, text: str) -> float:
    m = _SECONDS.fullmatch(token)
    if not m:
        raise ValueError(f"policy {text!r}: {token!r} is not a duration such as 2s, 0.5s or 250ms")
    return float(m["v"]) / (1000 if m["unit"] == "ms" else 1)


def _parse_compact(text: str) -> tuple[str, dict[str, Any]]:
    """``kind [base[..cap]] [xN]``, e.g. ``exponential 1s..30s x5``."""
    kind, *tokens = text.split()
    values: dict[str, Any] = {}
    for token in tokens:
        if token[:1] in "xX" and token[1:].isdigit():
            values["max_attempts"] = int(token[1:])
        elif ".." in token and not token.startswith(".."):
            low, high = token.split("..", 1)
            values["base"], values["cap"] = _seconds(low, text), _seconds(high, text)
        elif "base" not in values:
            values["base"] = _seconds(token, text)
        else:
            raise ValueError(f"policy {text!r}: unexpected {token!r} (write kind base..cap xN, e.g. "
                             f"'exponential 1s..30s x5')")
    return kind, values


def _parse_call(text: str) -> tuple[str, dict[str, Any]]:
    """``kind(base=1, cap=30, max_attempts=5)`` or positional ``kind(1, 30, 5)``."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        node = None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"policy {text!r} is not of the form kind(base=..., cap=..., max_attempts=...)")
    if len(node.args) > 3:
        raise ValueError(f"policy {text!r}: at most 3 positional arguments (base, cap, max_attempts)")
    values: dict[str, Any] = {}
    for name, arg in zip(("base", "cap", "max_attempts"), node.args):
        values[name] = _number(arg, text)
    for kw in node.keywords:
        key = "max_attempts" if kw.arg == "max" else kw.arg
        if key not in ("base", "cap", "max_attempts"):
            raise ValueError(f"policy {text!r}: unknown argument {kw.arg!r} (use base, cap, max_attempts)")
        values[key] = _number(kw.value, text)
    if isinstance(values.get("max_attempts"), float) and values["max_attempts"].is_integer():
        values["max_attempts"] = int(values["max_attempts"])
    return node.func.id, values


def parse_policy(spec: Any, current: Policy | None = None) -> Policy:
    """A :class:`Policy` from a Policy, a dict, or text.

    Text is compact, ``kind [base[..cap]] [xN]`` (``exponential 1s..30s x5``:
    base 1 s, cap 30 s, 5 attempts in all; ``fixed 2s x3``; ``immediate x3``),
    or a call, ``exponential(base=1, cap=30, max_attempts=5)``.  Without
    ``xN`` each job keeps its own max_attempts.  ``current`` is qkit's own
    policy with the queue's settings (``current``; from the environment when
    not given) and may override them: ``current x5``.  The text is the
    policy's name.
    """
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, Mapping):
        data = dict(spec)
        if "max" in data:
            data["max_attempts"] = data.pop("max")
        unknown = set(data) - {"kind", "base", "cap", "max_attempts", "name"}
        if unknown or "kind" not in data:
            raise ValueError(f"policy {spec!r}: needs 'kind' and only base, cap, max_attempts, name")
        if data["kind"] == "current":
            return replace(current or _env_current(), **{k: v for k, v in data.items() if k != "kind"})
        return Policy(**data)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a policy must be text, a dict or a Policy (got {spec!r})")
    text = " ".join(spec.split())
    kind, values = _parse_call(text) if "(" in text else _parse_compact(text)
    if kind == "current":
        return replace(current or _env_current(), **values, name=text)
    if kind not in KINDS:
        raise ValueError(f"policy {text!r}: unknown kind {kind!r}; use current or one of {', '.join(KINDS)}")
    return Policy(kind, **{k: v for k, v in values.items() if v is not None or k == "max_attempts"}, name=text)


def _env_current() -> Policy:
    from qkit.config import settings

    s = settings()
    return current_policy(s.backoff_base, s.backoff_max)


def parse_policies(specs: Iterable[Any], current: Policy | None = None) -> list[Policy]:
    """Parse several policies; names must be unique."""
    out = [parse_policy(s, current) for s in specs]
    names = [p.name for p in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"policy names must be unique: {', '.join(dupes)}")
    if not out:
        raise ValueError("give at least one policy")
    return out


def check_policies(specs: Any) -> None:
    """Raise ValueError if ``specs`` (a list) holds a policy that does not parse; for notebook checks."""
    parse_policies(specs, current=current_policy(2.0, 300.0))
