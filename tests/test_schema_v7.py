"""Schema v7 (the workload controls): a v6 ledger is upgraded in place on SQLite and PostgreSQL, rows kept."""
from __future__ import annotations

from sqlalchemy import inspect as inspect_db, text

from conftest import scratch_ledger
from qkit.ledger import SCHEMA_VERSION, Ledger, schema_info

NEW_COLUMNS = {"jobs": {"owner", "progress", "progress_note", "progress_at"}, "job_attempts": {"retry_after_ms"},
               "worker_runs": {"released"}}


def test_a_v6_ledger_gains_the_v7_columns_and_tables_in_place(setup, tmp_path):
    with scratch_ledger(setup, tmp_path, "qkit_v7") as url:
        ledger = Ledger(url)
        try:
            assert ledger.init_schema() == SCHEMA_VERSION >= 7
            with ledger.engine.begin() as conn:  # a v6 ledger, as written before: no v7 columns or tables
                conn.execute(text("DROP INDEX ix_jobs_owner"))
                for table_name, names in NEW_COLUMNS.items():
                    for name in names:
                        conn.execute(text(f"ALTER TABLE {table_name} DROP COLUMN {name}"))
                conn.execute(text("DROP TABLE schedules"))
                conn.execute(text("DROP TABLE queue_controls"))
                conn.execute(schema_info.update().values(version=6))
                conn.execute(text("INSERT INTO jobs (queue, type, payload, status, priority, attempts, max_attempts,"
                                  " run_at, created_at, updated_at, epoch) VALUES ('default', 't', '{}', 'pending',"
                                  " 0, 0, 3, '2026-01-01', '2026-01-01', '2026-01-01', 0)"))
            ledger.engine.dispose()
            assert ledger.init_schema() == SCHEMA_VERSION
            found = inspect_db(ledger.engine)
            for table_name, names in NEW_COLUMNS.items():
                assert names <= {c["name"] for c in found.get_columns(table_name)}, table_name
            assert {"schedules", "queue_controls"} <= set(found.get_table_names())
            assert "ix_jobs_owner" in {i["name"] for i in found.get_indexes("jobs")}
            with ledger.engine.connect() as conn:
                assert conn.execute(text("SELECT type, owner, progress FROM jobs")).all() == [("t", None, None)]
        finally:
            ledger.close()
