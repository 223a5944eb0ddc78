"""The process that runs one flow of the local backend: ``python -m crystaloop.dft.local_worker DIR``.

It reads ``DIR/flow.json``, runs the flow with ``jobflow.run_locally`` into crystaloop's
job store, and keeps ``DIR/status.json`` (running, then completed or failed with the
reason). A SIGTERM stops it, and its pw.x with it, leaving the status ``running`` so the
backend sees the flow as stopped rather than finished.

``python -m crystaloop.dft.local_worker --serve`` is the fork server the backend starts
once: it imports jobflow, the job store and each flow's job modules once, then forks one
worker process per flow (its own session, its own ``worker.log``), so a flow does not pay
a fresh Python start and those imports. It reads one JSON request a line on stdin
(``{"folder": ..., "env": {...}}``), answers the worker's pid a line on stdout, and exits
when stdin closes; the workers it forked go on.
"""

from __future__ import annotations

import json
import logging
import os
import re
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
    # On the manager's own logger: run_local(log=True) resets the handlers of "jobflow".
    logging.getLogger("jobflow.managers.local").addHandler(errors)
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


#: Imported by the fork server before its first fork: what every flow needs.
PRELOAD = (
    "jobflow",
    "jobflow.managers.local",
    "jobflow.utils.graph",
    "jobflow.core.schemas",
    "monty.json",
    "crystaloop.db.connection",
    "crystaloop.dft.backends",
)


def _job_modules(folder: Path) -> set[str]:
    """The modules of the job functions (and makers) named in ``folder/flow.json``."""
    try:
        text = (folder / "flow.json").read_text()
    except OSError:
        return set()
    return set(re.findall(r'"@module": "([A-Za-z_][\w.]*)"', text))


def _preload(modules, done: set[str]) -> None:
    """Import ``modules`` in the fork server so its workers start with them (errors: left to the worker)."""
    import importlib

    for name in sorted(set(modules) - done):
        done.add(name)
        try:
            importlib.import_module(name)
        except Exception:  # the worker imports it again and records the failure in its status
            pass


def _child(request: dict, ready: int) -> None:
    """In the forked worker: a session of its own, the folder's log as stdout/stderr, then :func:`main`.

    ``ready`` (a pipe's write end) is closed once the session exists.
    """
    code = 1
    try:
        os.setsid()  # its pw.x (or mpirun) is stopped with it, as a group
        os.close(ready)
        # As in a fresh Python: ended children (pw.x) waited for, SIGINT a KeyboardInterrupt.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        folder = Path(request["folder"])
        log = os.open(folder / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        os.environ.update(request.get("env") or {})
        code = main(folder)
    except SystemExit as exc:  # SIGTERM (see _terminate)
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve(preload=PRELOAD) -> int:
    """The fork server: one forked worker per request line, its pid answered; ends with stdin."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps ended workers: no zombies
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    done: set[str] = set()
    _preload(preload, done)
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        _preload(_job_modules(Path(request["folder"])), done)
        answers.flush()
        sys.stderr.flush()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            _child(request, ready_w)  # never returns
        os.close(ready_w)
        os.read(ready_r, 1)  # EOF once the worker leads its own session: the pid answered is a group too
        os.close(ready_r)
        answers.write(f"{pid}\n".encode())
        answers.flush()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        sys.exit(serve())
    sys.exit(main(Path(sys.argv[1])))
