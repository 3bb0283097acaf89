"""A real ``lopa serve`` in a subprocess on loopback, for the server tests (transformers and vLLM).

``start_server`` launches the command with its output in a log file; ``wait_healthy`` waits for
``/health``; ``stop_server`` sends SIGINT and checks for a clean exit, with the log's tail in every
failure message. ``serve_in_thread`` runs an app built in the test's own process (uvicorn in a thread).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(app, log_level: str = "warning") -> tuple[object, threading.Thread, str]:
    """Serve ``app`` with uvicorn in a daemon thread on a free loopback port; (the uvicorn server, its
    thread, its base url) once it accepts connections. Stop it with ``server.should_exit = True``."""
    import uvicorn
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    return srv, thread, f"http://127.0.0.1:{port}"


def start_server(args: list[str], log: Path, env: dict[str, str], verb: str = "serve") -> tuple[subprocess.Popen, str]:
    """Start ``python -m lopa VERB ARGS --port P`` (``serve``, or ``gateway``); (the process, its base
    url). Does not wait."""
    port = free_port()
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "lopa", verb, *args, "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout_s: float, poll_s: float = 0.2) -> None:
    """Return once ``GET /health`` answers 200; fail the test if the server exits or is late."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start in {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(poll_s)


def stop_server(proc: subprocess.Popen, log: Path, timeout_s: float = 30) -> None:
    """SIGINT, then the server must finish its work and exit 0 within ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"server did not stop within {timeout_s:.0f} s of SIGINT")
    assert rc == 0, log.read_text()[-4000:]
