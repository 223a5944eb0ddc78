"""The process that runs one flow of the local backend: ``python -m crystaloop.dft.local_worker DIR``.

It reads ``DIR/flow.json``, runs the flow with ``jobflow.run_locally`` into crystaloop's
job store, and keeps ``DIR/status.json`` (running, then completed or failed with the
reason). A SIGTERM stops it, and its pw.x with it, leaving the status ``running`` so the
backend sees the flow as stopped rather than finished.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path


def _write(folder: Path, **fields) -> None:
    doc = {"since": datetime.now(UTC).isoformat(), **fields}
    tmp = folder / "status.json.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, folder / "status.json")


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds subprocess.run, which kills pw.x


class _LastError(logging.Handler):
    """Keeps the last line of the last job exception jobflow logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.line: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "failed with exception" in message:
            lines = [line for line in message.splitlines() if line.strip()]
            self.line = lines[-1].strip()[:300] if lines else None


def main(folder: Path) -> int:
    """Run the flow in ``folder``; 0 when every job gave an output."""
    from jobflow import Flow
    from monty.json import MontyDecoder

    from crystaloop.dft.backends import run_local

    signal.signal(signal.SIGTERM, _terminate)
    started = datetime.now(UTC).isoformat()
    common = {"candidate_id": folder.name, "pid": os.getpid(), "host": socket.gethostname(), "started_at": started}
    _write(folder, state="running", **common)
    doc = MontyDecoder().process_decoded(json.loads((folder / "flow.json").read_text()))
    flow = Flow(doc["jobs"], output=doc["output"], name=doc["name"], uuid=doc["uuid"])
    run_dir = folder / "run"
    run_dir.mkdir(exist_ok=True)
    errors = _LastError()
    logging.getLogger("jobflow").addHandler(errors)
    try:
        responses = run_local(flow, root_dir=run_dir, log=True)
    except Exception as exc:  # recorded as the flow's failure, with its reason
        _write(folder, state="failed", reason=f"{type(exc).__name__}: {exc}"[:300], **common,
               ended_at=datetime.now(UTC).isoformat())  # fmt: skip
        return 1
    missing = [job.name for job in flow.jobs if job.uuid not in responses]
    ended = datetime.now(UTC).isoformat()
    if missing:
        reason = f"job(s) {', '.join(missing)} raised {errors.line or 'an error'}; see {folder / 'worker.log'}"
        _write(folder, state="failed", reason=reason, **common, ended_at=ended)
        return 1
    _write(folder, state="completed", **common, ended_at=ended)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
