"""A temporary Prefect API server that boots while the command line loads JAX and the flow.

Prefect starts the same temporary server by itself when `PREFECT_API_URL` is unset, but
only when the flow begins, after every import. Booting it takes about 4 s on 2 cores.
Starting it as the first step of `crackjax train`, in its own process, overlaps the two.
The server runs the same command and settings as Prefect 3.9's `SubprocessASGIServer`,
uses the SQLite database of `PREFECT_HOME`, listens on 127.0.0.1 only, and is stopped
when the command ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.util import find_spec
from pathlib import Path

STARTUP_TIMEOUT_SECONDS = 60.0


class TemporaryServer:
    """A Prefect API server process on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        spec = find_spec("prefect")
        if spec is None or spec.origin is None:
            raise RuntimeError("the prefect package is not installed; run `make install`")
        # The variables Prefect 3.9 sets for its own temporary server: no UI, and the
        # server marks itself as ephemeral.
        server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        command = [
            sys.executable, "-m", "uvicorn",
            "--app-dir", str(Path(spec.origin).parent.parent),
            "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--log-level", "error", "--lifespan", "on",
        ]
        self.process = subprocess.Popen(command, env={**os.environ, **server_env}, stdin=subprocess.DEVNULL)

    def wait_until_ready(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Block until the server passes its health check; raise RuntimeError when it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {self.process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the temporary Prefect server at {self.api_url} did not respond within {timeout:.0f} s; check that port and PREFECT_HOME, or set PREFECT_API_URL to a running server")

    def stop(self) -> None:
        """Terminate the server process, killing it after 5 s."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
