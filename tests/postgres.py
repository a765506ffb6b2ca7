"""A throwaway PostgreSQL server for the distributed tests and the workers benchmark.

``AUTOBATCH_TEST_POSTGRES_URL`` (``postgresql+psycopg://user:password@127.0.0.1:5432/postgres``,
set by ``.ci/run``) names a running server; without it, a private server is started with
Debian's ``initdb``/``pg_ctl`` (package ``postgresql``) on 127.0.0.1 in a temporary data
directory, with password authentication, and removed afterwards. Every test gets a
database of its own on that server.

When ``CI`` is set, a missing server fails the tests that need it instead of skipping
them (the hooks in ``tests/conftest.py``): CI must not go green without having run them.
A server named by the variable that does not answer fails them everywhere. Elsewhere they skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import skip_missing

ENV_URL = "AUTOBATCH_TEST_POSTGRES_URL"
USER = "autobatch"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be found or started."""


class PostgresServer:
    """A server reachable as superuser at ``url`` (database ``postgres``)."""

    def __init__(self, url: str, data_dir: Path | None = None, run_as: str | None = None, bin_dir: Path | None = None):
        self.url = url
        self.data_dir = data_dir
        self.run_as = run_as
        self.bin_dir = bin_dir

    def create_database(self, prefix: str = "autobatch_test") -> str:
        """A new, empty database on this server; returns its URL."""
        name = f"{prefix}_{secrets.token_hex(4)}"
        with _admin_connection(self.url) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return _with_database(self.url, name)

    def drop_database(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        name = make_url(url).database
        with _admin_connection(self.url) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop a server this module started, and remove its files."""
        if self.data_dir is None:
            return
        _run(
            self.run_as,
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir / "data"), "-m", "immediate", "stop"],
            check=False,
        )
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir = None


def server_from_environment_or_start() -> PostgresServer:
    """The server named by ``AUTOBATCH_TEST_POSTGRES_URL``, else a new private one."""
    url = os.environ.get(ENV_URL)
    if url:
        try:
            with _admin_connection(url):
                pass
        except Exception as error:
            raise PostgresUnavailable(f"{ENV_URL} is set but the server does not answer: {error}") from None
        return PostgresServer(url)
    return start_private_server()


def start_private_server() -> PostgresServer:
    """initdb + pg_ctl start on 127.0.0.1 and a free port, in a new temporary directory."""
    bin_dir = _find_bin_dir()
    run_as = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root and there is no 'postgres' user to run the server as") from None
        run_as = "postgres"
    base = Path(tempfile.mkdtemp(prefix="autobatch-pg-"))
    password = secrets.token_hex(12)
    (base / "pwfile").write_text(password + "\n")
    if run_as:
        entry = pwd.getpwnam(run_as)
        for path in (base, base / "pwfile"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    port = _free_port()
    data = base / "data"
    try:
        _run(
            run_as,
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                USER,
                "--auth=scram-sha-256",
                f"--pwfile={base / 'pwfile'}",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='{base}' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        _run(
            run_as,
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(base / "log"),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    except PostgresUnavailable:
        log = base / "log"
        detail = log.read_text()[-2000:] if log.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        raise PostgresUnavailable(f"could not start PostgreSQL from {bin_dir}: {detail}") from None
    url = f"postgresql+psycopg://{USER}:{password}@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + 30
    while True:
        try:
            with _admin_connection(url):
                break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return PostgresServer(url, data_dir=base, run_as=run_as, bin_dir=bin_dir)


def _find_bin_dir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    raise PostgresUnavailable(
        f"no PostgreSQL server: set {ENV_URL}, or install the server (Debian: apt-get install postgresql)"
    )


def _run(run_as: str | None, command: list[str], check: bool = True) -> None:
    if run_as:
        command = ["runuser", "-u", run_as, "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, cwd="/")
    if check and done.returncode != 0:
        raise PostgresUnavailable(f"{' '.join(command)} failed: {(done.stderr or done.stdout).strip()[-1000:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _admin_connection(url: str):
    import psycopg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return psycopg.connect(
        host=parsed.host,
        port=parsed.port or 5432,
        user=parsed.username,
        password=parsed.password,
        dbname=parsed.database or "postgres",
        autocommit=True,
        connect_timeout=10,
    )


def _with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


# pytest fixtures: a test module imports them (``from tests.postgres import postgres_url``).


@pytest.fixture(scope="session")
def postgres_server():
    try:
        server = server_from_environment_or_start()
    except PostgresUnavailable as error:
        if os.environ.get(ENV_URL):  # a server named but not there is a broken set-up, CI or not
            pytest.fail(f"no PostgreSQL server can be had: {error}")
        skip_missing("PostgreSQL", str(error))  # fails under CI (tests/conftest.py)
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """The URL of a new, empty database, dropped after the test."""
    url = postgres_server.create_database()
    yield url
    try:
        postgres_server.drop_database(url)
    except Exception:
        pass
