"""The embedded MongoDB-wire server (SecantusDB's ``secantusd-py``).

crystaloop starts it as a separate process and never imports it. The port and
pid are recorded in ``<data_dir>/db/server.json``; a live server is reused and
a record left by a dead one is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pymongo
from pymongo.errors import PyMongoError

from crystaloop.errors import UserError

SERVER_EXECUTABLE = "secantusd-py"


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _executable() -> str:
    beside_python = Path(sys.executable).parent / SERVER_EXECUTABLE
    found = shutil.which(SERVER_EXECUTABLE) or (str(beside_python) if beside_python.exists() else None)
    if not found:
        raise UserError(
            f"{SERVER_EXECUTABLE} not found; install it with 'pip install \"SecantusDB>=0.7.0b3\"' "
            "or set CRYSTALOOP_MONGODB_URI to an existing MongoDB"
        )
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _serves(record: ServerRecord) -> bool:
    """True when ``record.pid`` is alive and is the server the record describes.

    A server that died (OOM, reboot) leaves its record behind, and the system may give its
    pid to another process: that one must never be signalled or waited for. Where the
    command line cannot be read (no ``/proc``), whatever answers at the port is taken as it.
    """
    if not _pid_alive(record.pid):
        return False
    try:
        words = Path(f"/proc/{record.pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return ping(record.uri)
    return record.storage_path in words and str(record.port) in words


def ping(uri: str, timeout_ms: int = 500) -> bool:
    """True if a MongoDB-wire server answers ``ping`` at ``uri``."""
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms)
    try:
        client.admin.command("ping")
        return True
    except PyMongoError:
        return False
    finally:
        client.close()


@dataclass
class ServerRecord:
    """What is written to ``server.json``."""

    host: str
    port: int
    pid: int
    storage_path: str

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"


class EmbeddedServer:
    """Start, reuse and stop the embedded server under ``<data_dir>/db``.

    Parameters
    ----------
    data_dir
        crystaloop's state directory.
    host
        Interface to bind; loopback by default.
    """

    def __init__(self, data_dir: Path, host: str = "127.0.0.1") -> None:
        self.root = Path(data_dir).expanduser() / "db"
        self.host = host
        self.record_path = self.root / "server.json"
        self.storage_path = self.root / "data"
        self.log_path = self.root / "server.log"

    def read_record(self) -> ServerRecord | None:
        """The recorded server, or None when there is no record."""
        try:
            return ServerRecord(**json.loads(self.record_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def running(self) -> ServerRecord | None:
        """The recorded server if it is alive and answers ``ping``; cleans a stale record.

        Raises
        ------
        UserError
            The recorded server is alive but does not answer, even with a longer wait.
        """
        record = self.read_record()
        if record is None:
            return None
        if not _serves(record):
            self.record_path.unlink(missing_ok=True)
            return None
        if ping(record.uri) or ping(record.uri, timeout_ms=5000):
            return record
        # Alive but silent (stopped, swapped out): its record stays, so `db stop` can still find it.
        raise UserError(
            f"the embedded database (pid {record.pid}) is running but does not answer at {record.uri}; "
            "stop it with `crystaloop db stop` and retry"
        )

    def start(self, timeout: float = 60.0) -> ServerRecord:
        """Reuse a live server or start a new one and wait for ``ping``."""
        live = self.running()
        if live is not None:
            return live
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"cannot create the database folder {self.root} ({exc.strerror}); "
                "point CRYSTALOOP_DATA_DIR at a writable folder"
            ) from None
        port = find_free_port(self.host)
        cmd = [
            _executable(),
            "--host",
            self.host,
            "--port",
            str(port),
            "--storage-path",
            str(self.storage_path),
            "--log-level",
            "WARNING",
            # A standalone server writes no oplog: nothing here uses change streams or
            # transactions, and skipping the oplog copy of each written document makes
            # inserts and updates 1.5-3x faster.
            "--standalone",
            # Fsync the log at each commit: a server killed hard (OOM, SIGKILL, power) keeps every
            # acknowledged write, so a campaign resumes from what it was told was stored. Bulk
            # inserts are one commit and keep their speed; single writes get several times slower.
            "--sync-on-commit",
        ]
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        record = ServerRecord(self.host, port, proc.pid, str(self.storage_path))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise UserError(
                    f"the embedded database exited at start (code {proc.returncode}); "
                    f"see {self.log_path}, or set CRYSTALOOP_MONGODB_URI to an existing MongoDB"
                )
            if ping(record.uri, timeout_ms=300):
                self.record_path.write_text(json.dumps(record.__dict__))
                return record
            time.sleep(0.1)
        proc.terminate()
        raise UserError(f"the embedded database did not answer within {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop the recorded server. Returns True if one was running."""
        record = self.read_record()
        self.record_path.unlink(missing_ok=True)
        if record is None or not _serves(record):
            return False
        os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _pid_alive(record.pid):
            time.sleep(0.1)
        if _pid_alive(record.pid):
            os.kill(record.pid, signal.SIGKILL)
        return True
