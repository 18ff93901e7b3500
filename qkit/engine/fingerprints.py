"""Error fingerprints: what a person would call one error, for DLQ triage (docs/semantics.md#dead-letter-queue).

Pure: text in, text out.  Stored with each attempt (``job_attempts.fingerprint``,
at most 200 characters); ``qkit dlq list --group`` and ``dlq_groups`` group by it.

* With a traceback, the key is the exception's type and **the handler's own
  frame**, as Sentry groups by type and stack rather than by message: the
  handler's entry frame (below :func:`qkit.engine.handlers.run_in_context`) and
  the innermost frame of the handler's own code (skipping the standard
  library, installed packages and qkit itself), named by file, function and
  source line, never the line number, so an edit elsewhere in the file keeps
  the group; one helper failing under two handlers is two groups.  The
  message is left out: ``order 5 failed`` and ``order 6 failed`` raised on one
  line are one error.
* Without one (lost leases, timeouts, unknown types, rows written before), the
  type plus the first line of the message with its variable parts masked:
  quoted values become ``'?'``; numbers (a unit stays: ``<*>ms``) and id-like
  tokens (any token with a digit: ``x5``, ``job-123``, ``0x7f3a``, UUIDs,
  hashes; and runs of 8+ hex letters) all become ``<*>``, one placeholder, as
  the same slot may hold ``298`` in one message and ``job-298`` in the next.

Fingerprints stored by earlier versions stay as they are: grouping works on
what is stored, so old and new failures of one error may show as two groups.
"""
from __future__ import annotations

import hashlib
import os
import re
import sysconfig

MAX_FINGERPRINT = 200  # job_attempts.fingerprint is VARCHAR(200)

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_TOKEN = re.compile(r"\w+(?:[-.:]\w+)*")
#: a number, and the unit that may follow it (``2.5s``, ``100ms``, ``3GB``, ``2x``)
_NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)(s|ms|us|µs|ns|min|h|kb|mb|gb|tb|kib|mib|gib|x)?",
                     re.I)
_HEX_WORD = re.compile(r"[a-f]{8,}", re.I)
_SIGNED = re.compile(r"(?<![\w>])[-+](?=<\*>)")
VARIABLE = "<*>"
_TYPE = re.compile(r"([A-Za-z_][\w.]*)(:\s?|$)")
_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')

_QKIT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_BUILT_IN_HANDLERS = os.path.join(_QKIT_DIR, "engine", "handlers.py")
_LIBRARY_DIRS = tuple(sorted({os.path.abspath(p) + os.sep for key in ("stdlib", "platstdlib", "purelib", "platlib")
                              if (p := sysconfig.get_paths().get(key))}))


def fingerprint(error: str | None, traceback: str | None = None) -> str | None:
    """The group key of an attempt's error (None when there is no error)."""
    if not error:
        return None
    head = error.splitlines()[0] if error.strip() else error
    m = _TYPE.match(head)
    etype, message = (m.group(1), head[m.end():]) if m else ("", head)
    frame = handler_frame(traceback) if traceback else None
    if frame is not None and etype:
        return _fit(f"{etype} at {frame}")
    masked = mask(message)
    return (f"{etype}{m.group(2)}{masked}" if m else masked)[:MAX_FINGERPRINT]


def mask(message: str) -> str:
    """``message`` with quoted values, numbers and id-like tokens masked (idempotent)."""
    text = _QUOTED.sub("'?'", message)
    text = _TOKEN.sub(_mask_token, text)
    return _SIGNED.sub("", text)


def _mask_token(m: re.Match[str]) -> str:
    token = m.group(0)
    if not any(c.isdigit() for c in token):
        return VARIABLE if _HEX_WORD.fullmatch(token) else token
    number = _NUMBER.fullmatch(token)
    return VARIABLE + (number.group(2) or "" if number is not None else "")


def handler_frame(traceback: str) -> str | None:
    """Where a formatted traceback left the handler's code, or None: ``file:function: source line`` of
    the handler's frame, or ``file:handler > [file:]function: source line`` when the error came out of
    one of its own helpers.

    Only the last traceback block counts (the exception raised, not the ones it
    was raised while handling).  The handler's frames are those after qkit's
    ``run_in_context``: its entry (the first of them that is its own code) and
    the innermost of its own code (library frames below it are skipped).
    """
    start = traceback.rfind("Traceback (most recent call last):")
    if start < 0:
        return None
    frames: list[tuple[str, str, str]] = []
    lines = traceback[start:].splitlines()
    for i, line in enumerate(lines):
        m = _FRAME.match(line)
        if m is None:
            continue
        source = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].startswith("    ") else ""
        frames.append((m.group("file"), m.group("func"), source or f"line {m.group('line')}"))
    for i in range(len(frames) - 1, -1, -1):  # below the last call into a handler
        if frames[i][1] == "run_in_context" and _same_file(frames[i][0], _BUILT_IN_HANDLERS):
            frames = frames[i + 1:]
            break
    if not frames:
        return None
    own = [f for f in frames if _is_own(f[0])] or frames[:1]
    (entry_file, entry_func, _), (file, func, source) = own[0], own[-1]
    if own[0] is own[-1]:
        return f"{os.path.basename(file)}:{func}: {source}"
    inner = func if file == entry_file else f"{os.path.basename(file)}:{func}"
    return f"{os.path.basename(entry_file)}:{entry_func} > {inner}: {source}"


def _fit(key: str) -> str:
    """``key`` within the column's 200 characters; a longer one keeps a hash of its whole text, so two
    keys that differ only past the cut stay apart."""
    if len(key) <= MAX_FINGERPRINT:
        return key
    return key[:MAX_FINGERPRINT - 10] + "… #" + hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:7]


def _same_file(a: str, b: str) -> bool:
    return os.path.abspath(a) == b


def _is_own(file: str) -> bool:
    """True for the handler's code: not the standard library, an installed package or qkit (its
    simulated handlers excepted), nor code without a file (``<frozen ...>``, ``<string>``)."""
    if file.startswith("<"):
        return False
    path = os.path.abspath(file)
    if path == _BUILT_IN_HANDLERS:
        return True
    return not (path.startswith(_QKIT_DIR) or path.startswith(_LIBRARY_DIRS)
                or f"{os.sep}site-packages{os.sep}" in path or f"{os.sep}dist-packages{os.sep}" in path)
