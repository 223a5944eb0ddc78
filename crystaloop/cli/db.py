"""``crystaloop db``: the embedded server and collection counts."""

from __future__ import annotations

import typer

from crystaloop.cli._common import console, group

app = group("Start, stop and inspect the database.")


@app.command("start")
def start() -> None:
    """Start the embedded server (or reuse the running one)."""
    from crystaloop.db.server import EmbeddedServer
    from crystaloop.settings import get_settings

    settings = get_settings()
    if not settings.uses_embedded_db:
        console.print(f"using {settings.safe_uri}; nothing embedded to start", highlight=False)
        return
    record = EmbeddedServer(settings.data_dir).start()
    console.print(f"embedded database at {record.uri} (pid {record.pid}, storage {record.storage_path})")


@app.command("stop")
def stop() -> None:
    """Stop the embedded server."""
    from crystaloop.db.server import EmbeddedServer
    from crystaloop.settings import get_settings

    settings = get_settings()
    stopped = EmbeddedServer(settings.data_dir).stop()
    console.print("embedded database stopped" if stopped else "no embedded database was running")


@app.command("status")
def status() -> None:
    """Show where the database is and how many documents each collection holds."""
    from rich.table import Table

    from crystaloop.db import COLLECTIONS, get_database
    from crystaloop.db.server import EmbeddedServer
    from crystaloop.db.summaries import COUNTER_COLLECTION, SUMMARY_COLLECTION
    from crystaloop.settings import get_settings

    settings = get_settings()
    if settings.uses_embedded_db:
        record = EmbeddedServer(settings.data_dir).running()
        if record is None:
            console.print("embedded database: not running (start it with 'crystaloop db start')")
            return
        console.print(f"embedded database at {record.uri} (pid {record.pid})")
    else:
        console.print(f"database at {settings.safe_uri}", highlight=False)
    database = get_database(settings)
    table = Table(title=f"database '{settings.database}'")
    table.add_column("collection")
    table.add_column("documents", justify="right")
    for name in (*COLLECTIONS, SUMMARY_COLLECTION, COUNTER_COLLECTION):
        table.add_row(name, str(database[name].estimated_document_count()))
    console.print(table)


@app.command("migrate")
def migrate(
    rebuild: bool = typer.Option(
        False, "--rebuild", help="Rebuild summaries and counters even when the layout is current."
    ),
) -> None:
    """Bring the candidate collections to the current layout (runs by itself on first use).

    ``--rebuild`` recomputes every summary and counter from the full candidate
    documents, e.g. after a process died between a transition and its summary.
    """
    from crystaloop.db import get_database
    from crystaloop.db.migrate import ensure_layout, migrate_candidates

    database = get_database()
    if rebuild:
        from crystaloop.db.campaigns import CampaignStore
        from crystaloop.errors import UserError

        running = CampaignStore(database).running()
        if running:
            # a rebuild recounts from one scan: writes made meanwhile would be lost from the counts
            raise UserError(
                f"campaign(s) {', '.join(running)} are running; stop them first "
                "(`crystaloop campaign stop NAME`), then rebuild"
            )
    report = migrate_candidates(database) if rebuild else ensure_layout(database)
    if report is None:
        console.print("candidate layout is current; nothing to migrate (use --rebuild to recount)")
        return
    console.print(
        f"candidates: {report.candidates}; summaries written: {report.summaries_written}; "
        f"orphan summaries removed: {report.orphan_summaries_removed}; counters: {report.counters}; "
        f"dropped indexes: {', '.join(report.dropped_indexes) or 'none'}",
        highlight=False,
    )
