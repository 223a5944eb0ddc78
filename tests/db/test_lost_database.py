"""A command whose database dies under it ends with one line and exit code 2, not a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pymongo

from crystaloop.db.server import EmbeddedServer


def test_load_prior_killed_server_gives_one_line(tmp_path):
    data_dir = tmp_path / "data"
    server = EmbeddedServer(data_dir)
    record = server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYSTALOOP_")}
    env.update(CRYSTALOOP_DATA_DIR=str(data_dir), CRYSTALOOP_DATABASE="lost")
    command = [str(Path(sys.executable).parent / "crystaloop"), "data", "load-prior"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = pymongo.MongoClient(record.uri, serverSelectionTimeoutMS=2000)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if client["lost"]["training_structures"].estimated_document_count() > 0:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "load-prior finished before the server could be killed"
        os.kill(record.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "lost the connection to MongoDB" in lines[0]
    assert "data load-prior" in lines[0] and "run the command again" in lines[0]
    assert "Traceback" not in err
