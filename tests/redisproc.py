"""Run a real ``redis-server`` (Debian's 7.0) for tests.

All settings are on the command line, no configuration file: bound to
127.0.0.1 on a free port, ``--dir`` the work directory, no RDB snapshots
(``--save ""``), the append-only file on or off, ``--requirepass`` when a
password is given. ``restart()`` keeps the port and the directory, so with
``appendonly=True`` the data written before comes back (redis 7 keeps the
append-only file under ``<workdir>/appendonlydir/``; with the default
``appendfsync everysec`` a ``kill9()`` may lose the last second of writes).

redis-py 8 quirks seen here: a client speaks RESP3 (``HELLO`` on connect), and
``AuthenticationError`` is a subclass of ``ConnectionError``, which its default
``Retry`` retries with backoff: a client with no or a wrong password takes
3-4 s to raise. ``no_retry()`` gives a ``Retry`` that fails at once
(``redis.Redis(..., retry=no_retry())``); ``start()`` polls with it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .conftest import free_port, kill9, terminate

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def no_retry() -> Retry:
    """A redis-py ``Retry`` that does not retry (errors raise at once)."""
    return Retry(NoBackoff(), 0)


class RedisProcess:
    """A ``redis-server`` subprocess with its own port and data directory."""

    def __init__(self, workdir: Path, password: str | None = None, appendonly: bool = True) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.appendonly = appendonly
        self.host = "127.0.0.1"
        self.port = free_port()
        self.log_path = self.workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def args(self) -> list[str]:
        args = [
            REDIS_SERVER,
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "",  # to stdout, which goes to log_path
        ]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client with the right password (``redis.Redis.from_url(self.url)``)."""
        return redis.Redis.from_url(self.url, **kwargs)

    def start(self, timeout: float = 10.0) -> RedisProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed by stop/kill9)
        self.proc = subprocess.Popen(
            self.args(), stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL, cwd=self.workdir
        )
        deadline = time.monotonic() + timeout
        client = self.client(socket_connect_timeout=0.5, socket_timeout=1.0, retry=no_retry())
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    self.proc = None
                    self._close_log()
                    raise RuntimeError(f"redis-server exited with {code}: {self.log_text()[-3000:]}")
                try:
                    if client.ping():
                        return self
                except redis.BusyLoadingError:
                    pass  # still loading the append-only file
                except redis.ConnectionError:
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout} s: {self.log_text()[-3000:]}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (redis flushes the append-only file and exits), SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        code = terminate(self.proc, timeout)
        self.proc = None
        self._close_log()
        return code

    def kill9(self) -> None:
        if self.proc is None:
            return
        kill9(self.proc)
        self.proc = None
        self._close_log()

    def restart(self, timeout: float = 10.0) -> RedisProcess:
        """Stop (gracefully, if running) and start again on the same port and directory."""
        self.stop()
        return self.start(timeout)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
