"""Helpers the notebooks call: parameter checks, figures, records, seeded batches.

Parameters (docs/semantics.md#interfaces).  Each notebook has a cell tagged ``parameters`` with
annotated defaults (``n_jobs: int = 50  # how many jobs``, which
``papermill --help-notebook`` documents), and right after it a cell calling
:func:`check_params`.  papermill inserts its ``injected-parameters`` cell
between the two; the check then

* refuses names papermill injected that the notebook does not declare
  (papermill itself only warns).  They are read from the kernel's input
  history (``In``): papermill's injected cell is the last executed cell
  whose source starts with ``# Parameters``, and :mod:`ast` lists the names
  it assigns.  (So a defaults cell must not start with that comment; in an
  interactive session nothing was injected and nothing is refused.)
* checks each declared parameter's type and range, and converts what the
  ``-p`` option mangles: an ``int`` where a ``float`` is declared, and a
  JSON string (``-p ids "[1, 2]"``) where a ``list`` is declared;
* refuses anything that looks like a secret (a name such as ``token`` or
  ``password``, or a value equal to a secret environment variable):
  papermill writes parameters into the executed notebook, so secrets must
  come from the environment.
"""
from __future__ import annotations

import ast
import base64
import io
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from qkit.errors import BadInput

if TYPE_CHECKING:  # pandas is imported where a table is built: notebooks start faster
    import pandas as pd

#: the first line papermill writes into its injected-parameters cell (Python translator)
INJECTED_MARKER = "# Parameters"
RECORD_MIME = "application/vnd.qkit.record+json"
_SECRET_NAME = re.compile(r"secret|token|passw|api_?key|credential|private_?key", re.I)
_SECRET_ENV = ("UPSTASH_REDIS_REST_TOKEN", "WORKER_SECRET", "QKIT_API_TOKEN", "QSTASH_CURRENT_SIGNING_KEY",
               "QSTASH_NEXT_SIGNING_KEY")
#: variables holding URLs whose password is a secret too
_SECRET_URL_ENV = ("QKIT_REDIS_URL", "QKIT_DATABASE_URL")


class ParameterError(BadInput):
    """A notebook parameter is unknown, of the wrong type, or out of range."""


@dataclass(frozen=True)
class Param:
    """What a notebook parameter may hold.

    ``kind`` is ``int``, ``float``, ``str``, ``bool``, ``list`` or ``dict``;
    ``low``/``high`` bound numbers (inclusive) and list lengths; ``choices``
    lists allowed values; ``check`` is a function that raises ValueError
    with a reason (its return value, if not None, replaces the value).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    choices: Sequence[Any] | None = None
    check: Callable[[Any], Any] | None = None
    optional: bool = False  # None allowed


def injected_parameters(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """Names and values papermill injected into this kernel (empty when run by hand or by nbval)."""
    history = namespace.get("In") or namespace.get("_ih") or []
    for source in reversed(list(history)):
        if isinstance(source, str) and source.lstrip().startswith(INJECTED_MARKER):
            try:
                tree = ast.parse(source)
            except SyntaxError:
                return {}
            names: list[str] = []
            for node in tree.body:
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, ast.AnnAssign) else []
                names += [t.id for t in targets if isinstance(t, ast.Name)]
            return {n: namespace.get(n) for n in names}
    return {}


def _type_label(kind: type) -> str:
    return kind.__name__


def _coerce(name: str, value: Any, p: Param) -> Any:
    """The value converted to ``p.kind``; raises ParameterError with the reason."""
    if value is None:
        if p.optional:
            return None
        raise ParameterError(f"{name} must be {_type_label(p.kind)}, not None")
    kind = p.kind
    if kind is bool:
        if not isinstance(value, bool):
            raise ParameterError(f"{name} must be True or False (got {type(value).__name__} {value!r}; "
                                 f"papermill -p takes True/False, capitalised)")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ParameterError(f"{name} must be an integer (got {type(value).__name__} {value!r})")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParameterError(f"{name} must be a number (got {type(value).__name__} {value!r})")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ParameterError(f"{name} must be a finite number (got {value!r})")
        return value
    if kind is str:
        if not isinstance(value, str):
            # papermill -p turns digit-only text into numbers: "-r name 007" keeps it a string
            raise ParameterError(f"{name} must be a string (got {type(value).__name__} {value!r}; "
                                 f"pass it with papermill -r to keep it a string)")
        return value
    if kind in (list, dict):
        if isinstance(value, str):
            # -p cannot pass a list or a dict: accept its JSON text
            try:
                value = json.loads(value) if value.strip() else kind()
            except ValueError:
                raise ParameterError(f"{name} must be a {kind.__name__} (got the string {value!r}; pass JSON "
                                     f"text or use papermill -y/-f)") from None
        if kind is list and isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, kind):
            raise ParameterError(f"{name} must be a {kind.__name__} (got {type(value).__name__} {value!r})")
        return value
    if not isinstance(value, kind):
        raise ParameterError(f"{name} must be {_type_label(kind)} (got {type(value).__name__} {value!r})")
    return value


def _check_one(name: str, value: Any, p: Param) -> Any:
    value = _coerce(name, value, p)
    if value is None:
        return None
    size = len(value) if isinstance(value, (list, dict)) else value
    if p.low is not None and isinstance(size, (int, float)) and size < p.low:
        what = "length" if isinstance(value, (list, dict)) else "value"
        raise ParameterError(f"{name} {what} {size!r} is below the minimum {p.low:g}")
    if p.high is not None and isinstance(size, (int, float)) and size > p.high:
        what = "length" if isinstance(value, (list, dict)) else "value"
        raise ParameterError(f"{name} {what} {size!r} is above the maximum {p.high:g}")
    if p.choices is not None and value not in p.choices:
        raise ParameterError(f"{name} must be one of {', '.join(map(repr, p.choices))} (got {value!r})")
    if p.check is not None:
        try:
            checked = p.check(value)
        except (ValueError, TypeError, BadInput) as exc:
            raise ParameterError(f"{name}: {exc}") from None
        if checked is not None:
            value = checked
    return value


def _env_secrets() -> list[str]:
    """The secret values of this environment: tokens and keys, and the passwords inside the backend URLs."""
    from urllib.parse import unquote, urlsplit

    values = [os.environ.get(n) or "" for n in _SECRET_ENV]
    for name in _SECRET_URL_ENV:
        try:
            password = urlsplit(os.environ.get(name) or "").password
        except ValueError:
            password = None
        if password:
            values += [password, unquote(password)]
    return [v for v in values if len(v) >= 4]


def _texts(value: Any) -> list[str]:
    """Every string inside a parameter value (lists and dicts included, keys too)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _texts(v)]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in (*_texts(k), *_texts(v))]
    return []


def _looks_secret(value: Any) -> bool:
    """A value holding a secret of this environment, or any URL with a password in it."""
    from qkit.config import has_url_password

    texts = _texts(value)
    secrets_ = _env_secrets()
    return any(s in t for s in secrets_ for t in texts) or any(has_url_password(t) for t in texts)


def secret_parameter_problems(parameters: Mapping[str, Any]) -> list[str]:
    """Why these papermill parameters must not be used (empty when they may).

    papermill writes every parameter into the executed notebook (its
    ``injected-parameters`` cell), so a secret passed as one would be kept in
    ``scheduled/runs/``: refuse secret-looking names, secret values and URLs
    with a password, before anything runs.
    """
    problems = []
    for name, value in parameters.items():
        if _SECRET_NAME.search(str(name)):
            problems.append(f"{name}: secrets must not be notebook parameters (papermill writes parameters "
                            f"into the executed notebook); set them in the environment")
        elif _looks_secret(value):
            problems.append(f"{name} holds a secret (a secret environment variable's value or a URL with a "
                            f"password); secrets must not be notebook parameters")
    return problems


def check_params(namespace: dict[str, Any], spec: Mapping[str, Param | type]) -> dict[str, Any]:
    """Validate a notebook's parameters; write converted values back into ``namespace``.

    ``namespace`` is the notebook's ``globals()``; ``spec`` maps each
    parameter name to a :class:`Param` (or a bare type).  Every problem is
    reported at once, one per line, in a :class:`ParameterError`.  Returns
    the validated parameters.
    """
    params = {name: p if isinstance(p, Param) else Param(p) for name, p in spec.items()}
    problems: list[str] = []
    injected = injected_parameters(namespace)
    unknown = sorted(set(injected) - set(params))
    if unknown:
        problems.append(f"unknown parameter(s) {', '.join(unknown)}: this notebook takes "
                        f"{', '.join(params)}")
    for name in sorted(set(injected) | set(params)):
        if _SECRET_NAME.search(name):
            problems.append(f"{name}: secrets must not be notebook parameters (papermill writes parameters "
                            f"into the executed notebook); set them in the environment")
    values: dict[str, Any] = {}
    for name, p in params.items():
        if name not in namespace:
            problems.append(f"{name} is not defined: the parameters cell must give it a default")
            continue
        secret_value = _looks_secret(namespace[name])
        try:
            values[name] = _check_one(name, namespace[name], p)
        except ParameterError as exc:
            # a type or range error quotes the value: never a secret's (named, not quoted)
            secret = secret_value or _SECRET_NAME.search(name)
            problems.append(f"{name} is not a valid {_type_label(p.kind)} parameter" if secret else str(exc))
        if secret_value:
            problems.append(f"{name} holds the value of a secret environment variable (or a URL with a "
                            f"password); secrets must not be notebook parameters")
    if problems:
        raise ParameterError("bad notebook parameters:\n  " + "\n  ".join(problems))
    namespace.update(values)
    return values


# ---------------------------------------------------------------- displays
def show(fig: Any, *, dpi: int = 100) -> None:
    """Display a matplotlib figure as a PNG output and close it.

    Works under any backend (Agg in papermill, inline in Jupyter), so the
    executed notebook and its HTML rendering always hold the image.
    """
    from IPython.display import display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    title = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) is not None else \
        (fig.axes[0].get_title() if fig.axes else "figure")
    display({"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": f"<figure: {title}>"},
            metadata={"image/png": {"alt": title}}, raw=True)  # alt: the HTML rendering's image description
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # a figure pyplot manages would stay open; qkit.analysis.plots makes none
        pyplot.close(fig)


def record(name: str, value: Any) -> None:
    """Leave a named JSON value in the executed notebook (read back with :func:`read_records`)."""
    from IPython.display import display

    display({RECORD_MIME: {"name": name, "value": value}}, raw=True)


def read_records(notebook: Any) -> dict[str, Any]:
    """The values :func:`record` left in an executed notebook (a path or a NotebookNode), by name.

    The last value recorded under a name wins.
    """
    import nbformat

    nb = notebook if isinstance(notebook, dict) else nbformat.read(os.fspath(notebook), as_version=4)
    out: dict[str, Any] = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {}).get(RECORD_MIME)
            if isinstance(data, dict) and "name" in data:
                out[data["name"]] = data.get("value")
    return out


# ---------------------------------------------------------------- batches
#: "mixed" batches: each built-in type with its own failure profile around ``fail_rate``
#: (fail-rate factor, share of the failures that are timeouts, latency factor)
MIXED_PROFILE = {
    "ai_text_generation": (1.0, 0.0, 1.0),
    "ai_image_generation": (1.3, 0.0, 3.0),
    "web_scraping": (1.6, 0.25, 0.5),
    "scheduled_publish": (0.3, 0.0, 0.5),
}


def seeded_batch(job_type: str = "mixed", n_jobs: int = 50, *, priority: int = 0, fail_rate: float = 0.3,
                 latency_ms: int = 5, max_attempts: int = 3, seed: int = 42) -> list[dict[str, Any]]:
    """A reproducible batch of simulated jobs for ``q.enqueue_many``.

    ``job_type`` is a built-in simulated type, or ``"mixed"`` for all four,
    each with its own failure profile (:data:`MIXED_PROFILE`).  ``seed``
    fixes the types, payloads and latencies.  Whether an attempt fails
    depends only on the job id and attempt number (docs/semantics.md#interfaces), so the same
    batch in a fresh ledger gives the same retry distribution.
    """
    from qkit.engine.handlers import BUILTIN_TYPES

    if job_type != "mixed" and job_type not in BUILTIN_TYPES:
        raise BadInput(f"job_type must be 'mixed' or one of {', '.join(BUILTIN_TYPES)} (got {job_type!r})")
    rng = random.Random(seed)
    items = []
    for i in range(n_jobs):
        kind = rng.choice(BUILTIN_TYPES) if job_type == "mixed" else job_type
        factor, timeout_share, lat_factor = MIXED_PROFILE[kind] if job_type == "mixed" else (1.0, 0.0, 1.0)
        rate = min(0.95, fail_rate * factor)
        latency = int(round(latency_ms * lat_factor * rng.uniform(0.5, 1.5)))
        simulate = {"fail_rate": round(rate * (1 - timeout_share), 4),
                    "timeout_rate": round(rate * timeout_share, 4), "latency_ms": latency}
        payload: dict[str, Any] = {"simulate": simulate, "seq": i, "seed": seed}
        if kind == "web_scraping":
            payload["url"] = f"https://example.org/page/{rng.randrange(10_000)}"
        elif kind == "ai_text_generation":
            payload["prompt"] = f"Summarise document {rng.randrange(10_000)}"
        elif kind == "ai_image_generation":
            payload["size"] = rng.choice(["512x512", "1024x1024"])
        else:
            payload["channel"] = rng.choice(["blog", "newsletter", "social"])
        items.append({"type": kind, "payload": payload, "priority": priority, "max_attempts": max_attempts})
    return items


# ---------------------------------------------------------------- ready-made parameter specs
def _queue_name(value: str) -> None:
    from qkit.model import check_name

    check_name(value, "queue name")


def _iso_time(value: str) -> None:
    from qkit.utc import as_utc

    as_utc(value)


def _job_ids(value: list) -> list[int]:
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise ValueError(f"job ids must be positive integers (got {bad!r})")
    return [int(v) for v in value]


#: a queue name: ``[a-z0-9_.-]{1,64}``
QUEUE = Param(str, check=_queue_name)
#: an ISO 8601 time, or "" for no bound
SINCE = Param(str, check=_iso_time)
#: a list of job ids (JSON text accepted)
JOB_IDS = Param(list, check=_job_ids)


# ---------------------------------------------------------------- small tables
def stats_table(q: Any) -> "pd.DataFrame":
    """``q.stats()`` as a one-row DataFrame: its scalars, and attempt counts as ``attempts_<outcome>``."""
    import pandas as pd

    stats = q.stats()
    row = {k: v for k, v in stats.items() if not isinstance(v, (dict, list, tuple))}
    row.update({f"attempts_{k}": v for k, v in (stats.get("attempts") or {}).items()})
    return pd.DataFrame([row])


def batch_table(batch: Sequence[Mapping[str, Any]], job_ids: Sequence[int]) -> "pd.DataFrame":
    """What :func:`seeded_batch` enqueued, per type: jobs, id range, failure profile, latency."""
    import pandas as pd

    rows = [{"type": b["type"], "id": i, "priority": b.get("priority", 0),
             "max_attempts": b.get("max_attempts", 3),
             "fail_rate": b["payload"]["simulate"].get("fail_rate", 0.0),
             "timeout_rate": b["payload"]["simulate"].get("timeout_rate", 0.0),
             "latency_ms": b["payload"]["simulate"].get("latency_ms", 0)} for b, i in zip(batch, job_ids)]
    df = pd.DataFrame(rows, columns=["type", "id", "priority", "max_attempts", "fail_rate", "timeout_rate",
                                     "latency_ms"])
    out = df.groupby("type").agg(jobs=("id", "size"), first_id=("id", "min"), last_id=("id", "max"),
                                 priority=("priority", "first"), max_attempts=("max_attempts", "first"),
                                 fail_rate=("fail_rate", "first"), timeout_rate=("timeout_rate", "first"),
                                 mean_latency_ms=("latency_ms", "mean"))
    return out.reset_index()
