"""The ``crystaloop`` command line.

Each command group lives in its own module and imports heavy dependencies
(torch, pw.x tooling) only inside its commands, so ``crystaloop --help`` is fast.
"""

from __future__ import annotations

import sys

import typer

from crystaloop.cli._common import console, report_user_error
from crystaloop.errors import UserError

app = typer.Typer(
    name="crystaloop",
    help="Active-learning DFT loop for inorganic crystals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from crystaloop.cli import (
        bench,
        campaign,
        data,
        db,
        dft,
        evaluate,
        generate,
        models,
        query,
        train,
    )

    app.add_typer(db.app, name="db", help="Start, stop and inspect the database.")
    app.command("query", help="Query candidates by campaign, formula, elements and property windows.")(
        query.query
    )
    app.add_typer(data.app, name="data", help="Build, load and import training data.")
    app.add_typer(train.app, name="train", help="Train the UNet, VAE and CGCNN models.")
    app.command("generate", help="Sample candidate crystals, filter them and store the shortlist.")(generate.generate)
    app.add_typer(dft.app, name="dft", help="Quantum ESPRESSO relaxations and pseudopotentials.")
    app.add_typer(campaign.app, name="campaign", help="Validate, run and report campaigns.")
    app.add_typer(models.app, name="models", help="The registry of trained models.")
    app.add_typer(evaluate.app, name="evaluate", help="Evaluate models against the papers' tables.")
    app.add_typer(bench.app, name="bench", help="Benchmarks with numbers to report.")


_register()


def main() -> None:
    """Console-script entry point: user errors print one line and exit 2.

    A database connection lost mid-command is a user error too: one line with the
    redacted URI, what was interrupted, and how to resume.
    """
    from pymongo.errors import AutoReconnect, ConnectionFailure, ServerSelectionTimeoutError

    from crystaloop.cli._common import sigterm_raises

    try:
        with sigterm_raises():
            app()
    except UserError as exc:
        report_user_error(exc)
        sys.exit(exc.exit_code)
    except (AutoReconnect, ConnectionFailure, ServerSelectionTimeoutError) as exc:
        report_user_error(lost_connection(exc, " ".join(sys.argv[1:3])))
        sys.exit(UserError.exit_code)


def lost_connection(exc: Exception, command: str) -> UserError:
    """The one-line error for a MongoDB connection lost while ``crystaloop <command>`` ran."""
    from crystaloop.settings import get_settings, redact_uri

    settings = get_settings()
    where = redact_uri(settings.mongodb_uri) if settings.mongodb_uri else f"the embedded server ({settings.data_dir})"
    return UserError(
        f"lost the connection to MongoDB at {where} ({type(exc).__name__}) during `crystaloop {command}`; "
        f"what was written is kept: start the database (`crystaloop db start`) and run the command again to resume"
    )


__all__ = ["app", "console", "main"]
