"""Reports with history: each report in its own folder, all of them listed in ``reports/index.html``.

A report (of the main job, or a scheduled one: ``python -m qkit.runs.reports``)
goes to ``reports/<UTC date>/<UTC time>-<label>/``: the executed notebooks,
the report rendered as standalone HTML, the worker runs it came from
rendered as HTML too (``runs/``), and ``report.json`` saying what it is
(kind, queue, batch or window, the runs).  :func:`write_index` lists every
``report.json`` under ``reports/``, newest first, with links; nothing is
overwritten, so two batches or two days can be compared
(``notebooks/compare_runs.ipynb``).

``python -m qkit.runs.reports [--queue Q] [--since 24h|ISO] [--reports DIR]``
executes ``notebooks/retry_analysis.ipynb`` over that window (e.g. from cron
after the day's bursts), links the scheduled worker runs of the window, and
updates the index.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

INDEX = "index.html"
META = "report.json"


def notebook_html(executed: Path) -> str:
    """An executed notebook as standalone HTML (code hidden, figures embedded, with alt text)."""
    import nbformat
    from nbconvert import HTMLExporter

    from qkit.analysis.notebook_helpers import RECORD_MIME

    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:  # records are for programs (read_records), not for readers
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if RECORD_MIME not in o.get("data", {})]
    exporter = HTMLExporter(template_name="classic", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    return body


def render_html(executed: Path, out: Path) -> int:
    """Render an executed notebook to a standalone HTML file (:func:`notebook_html`); returns its size in bytes.

    The dashboard serves the same rendering (``GET /runs/{id}/notebook``).
    """
    body = notebook_html(executed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    return out.stat().st_size


def report_dir(reports: Path, label: str, when: datetime | None = None) -> Path:
    """A new folder ``reports/<UTC date>/<UTC time>-<label>/`` (a suffix if that one exists)."""
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    slug = re.sub(r"[^a-z0-9_.-]+", "-", label.lower()).strip("-") or "report"
    base = reports / f"{when:%Y-%m-%d}" / f"{when:%H%M%S}-{slug}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    folder.mkdir(parents=True)
    return folder


def render_runs(records: Iterable[Any], folder: Path) -> list[dict[str, Any]]:
    """Render each scheduled run's executed notebook into ``folder/runs/``; their entries for report.json."""
    out = []
    for rec in records:
        entry = {"run_id": rec.run_id, "status": rec.status, "processed": rec.processed,
                 "started_at": rec.started_at, "html": None}
        source = Path(rec.output) if rec.output else None
        if source is not None and source.is_file():
            target = folder / "runs" / (source.stem + ".html")
            try:
                render_html(source, target)
                entry["html"] = str(target.relative_to(folder))
            except Exception as exc:  # noqa: BLE001 - a run that cannot be rendered is listed without a link
                entry["error"] = f"not rendered: {type(exc).__name__}"
        out.append(entry)
    return out


def write_meta(folder: Path, meta: dict[str, Any]) -> Path:
    path = folder / META
    path.write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    return path


def _entries(reports: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in reports.glob(f"*/*/{META}"):
        try:
            found.append((path.parent, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda e: (str(e[1].get("created_at", "")), str(e[0])), reverse=True)


def _source(meta: dict[str, Any]) -> str:
    batch = meta.get("batch") or {}
    if batch:
        return "batch " + ", ".join(f"{k} {v}" for k, v in batch.items())
    from qkit.analysis.tables import utc_time

    window = meta.get("window") or {}
    return "window " + " to ".join(utc_time(window.get(k)) or "…" for k in ("since", "until"))


def write_index(reports: Path) -> Path:
    """``reports/index.html``: every report under ``reports/``, newest first, with its runs."""
    rows = []
    for folder, meta in _entries(reports):
        rel = folder.relative_to(reports).as_posix()
        esc = html.escape
        report = meta.get("report")
        link = f'<a href="{esc(rel)}/{esc(report)}">{esc(meta.get("title", report))}</a>' if report else ""
        runs = meta.get("runs") or []
        run_links = ", ".join(
            (f'<a href="{esc(rel)}/{esc(r["html"])}">{esc(r["run_id"])}</a>' if r.get("html") else esc(r["run_id"]))
            + f' ({esc(str(r.get("status")))}, {int(r.get("processed") or 0)} jobs)' for r in runs) or "—"
        created = str(meta.get("created_at", ""))[:19].replace("T", " ")
        rows.append(f"<tr><td>{esc(created)}</td><td>{esc(str(meta.get('kind', '')))}</td>"
                    f"<td>{esc(str(meta.get('queue', '')))}</td><td>{esc(_source(meta))}</td><td>{link}</td>"
                    f"<td>{run_links}</td></tr>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qkit reports</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:80em}}table{{border-collapse:collapse;font-size:.9em}}
th,td{{text-align:left;padding:4px 8px;border-bottom:1px solid #ddd;vertical-align:top}}th{{border-bottom:2px solid #999}}
</style></head><body>
<h1>qkit reports</h1>
<p>Newest first. Each report keeps its executed notebooks and the worker runs it came from (times in UTC).</p>
<table><thead><tr><th>created (UTC)</th><th>kind</th><th>queue</th><th>batch or window</th><th>report</th>
<th>worker runs</th></tr></thead>
<tbody>
{chr(10).join(rows) or '<tr><td colspan="6">no reports yet</td></tr>'}
</tbody></table></body></html>
"""
    path = reports / INDEX
    path.write_text(page, encoding="utf-8")
    return path


def execute(notebook: Path, output: Path, parameters: dict[str, Any]) -> None:
    """Run a notebook through papermill (kernel python3 on this interpreter); its log goes beside the output."""
    from qkit.runs.runner import first_error, log_error, papermill_command

    output.parent.mkdir(parents=True, exist_ok=True)
    log = output.with_name(output.name + ".log")
    with open(log, "wb") as fh:
        rc = subprocess.run(papermill_command(notebook, output, parameters), stdin=subprocess.DEVNULL, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        why = first_error(output) or log_error(log) or f"papermill exited with status {rc}"
        raise RuntimeError(f"{notebook.name} failed: {why} (see {output} and {log.name})")


def publish(*, queue: str = "default", since: datetime | None = None, until: datetime | None = None,
            reports: Path | None = None, runs_dir: Path | None = None) -> Path:
    """A scheduled report: retry_analysis over ``since..until``, the window's scheduled runs; the index."""
    from qkit.runs.runrecord import RunRecord
    from qkit.runs.runner import child_env, default_runs_dir, read_sidecars, repo_root, resolve_home

    root = repo_root()
    reports = reports or root / "reports"
    os.environ.update(child_env(resolve_home()))
    now = datetime.now(timezone.utc)
    folder = report_dir(reports, f"scheduled-{queue}", now)
    params = {"queue": queue, "since": since.isoformat() if since else "", "until": until.isoformat() if until else ""}
    executed = folder / "retry_analysis.ipynb"
    execute(root / "notebooks" / "retry_analysis.ipynb", executed, params)
    render_html(executed, folder / "retry_analysis.html")
    cars = read_sidecars(runs_dir or default_runs_dir())
    records = []
    if len(cars):
        cars = cars[cars["queue"] == queue]
        starts = cars["started_at"].astype(str)
        keep = (starts >= (since.isoformat() if since else "")) & (starts < (until.isoformat() if until else "~"))
        fields = set(RunRecord.__dataclass_fields__)
        records = [RunRecord(**{k: v for k, v in r.items() if k in fields and v == v})
                   for r in cars[keep].to_dict("records")]
    write_meta(folder, {"kind": "scheduled", "created_at": now.isoformat(), "queue": queue,
                        "window": {"since": params["since"], "until": params["until"] or now.isoformat()},
                        "title": "retry analysis", "report": "retry_analysis.html",
                        "notebooks": ["retry_analysis.ipynb"], "runs": render_runs(records, folder)})
    write_index(reports)
    return folder / "retry_analysis.html"


def _when(text: str) -> datetime:
    m = re.fullmatch(r"(\d+)\s*([smhd])", text.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        return datetime.now(timezone.utc) - timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours",
                                                          "d": "days"}[unit]: n})
    from qkit.utc import as_utc

    return as_utc(text)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qkit.runs.reports", description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", default="default")
    p.add_argument("--since", default="24h", help="window start: 24h, 30m, 7d or an ISO 8601 time (default 24h)")
    p.add_argument("--until", default="", help="window end (ISO 8601; default now)")
    p.add_argument("--reports", type=Path, default=None, help="reports folder (default: reports/)")
    args = p.parse_args(argv)
    try:
        since = _when(args.since) if args.since else None
        until = _when(args.until) if args.until else None
    except ValueError as exc:
        print(f"qkit reports: {exc}", file=sys.stderr)
        return 2
    try:
        out = publish(queue=args.queue, since=since, until=until, reports=args.reports)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        from qkit.config import redact

        print(f"qkit reports: {type(exc).__name__}: {redact(str(exc).strip().splitlines()[-1] if str(exc) else '')}",
              file=sys.stderr)
        return 1
    print(f"report: {out}; index: {out.parent.parent.parent / INDEX}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
