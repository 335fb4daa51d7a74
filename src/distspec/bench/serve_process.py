"""`distspec serve` as a child process of a benchmark: started, waited for, stopped."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SERVING = re.compile(r"distspec: serving .* on (\S+):(\d+)$")
STOP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m distspec serve ARGS` on 127.0.0.1 with a free port; its stderr (and what
    it prints after the serving line) goes to log_path."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.args = [sys.executable, "-m", "distspec", "serve", "--host", "127.0.0.1"]
        self.args += ["--port", "0", *args]
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.address = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 600.0) -> str:
        """Start it and wait for its serving line; returns HOST:PORT. Raises RuntimeError
        with the end of its log when it exits or does not answer in timeout_s."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")  # noqa: SIM115 (held by the child and the drain thread)
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=log, text=True, env=self.env
        )
        found = threading.Event()

        def read_stdout() -> None:  # also keeps the pipe drained for the server's lifetime
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                match = SERVING.search(line.strip())
                if match and not found.is_set():
                    self.address = f"127.0.0.1:{match.group(2)}"
                    found.set()
                else:
                    log.write(line)
                    log.flush()
            log.close()

        threading.Thread(target=read_stdout, name="serve-stdout", daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not found.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                exited = self.proc.poll() is not None
                why = "exited" if exited else f"did not start in {timeout_s:g} s"
                self.stop()
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(f"distspec serve {why}: {' '.join(tail)} (log: {self.log_path})")
        return self.address

    def stop(self) -> int | None:
        """SIGTERM (a clean shutdown, Ray included), then SIGKILL to it and its descendants
        if it does not exit in STOP_TIMEOUT_S. Returns its exit status."""
        if self.proc is None:
            return None
        import psutil

        if self.proc.poll() is None:
            try:
                descendants = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                descendants = []
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                for child in descendants:
                    with contextlib.suppress(psutil.Error):
                        child.kill()  # psutil checks the pid was not reused meanwhile
                self.proc.wait()
        return self.proc.returncode
