"""A real OpenSSH server on a free loopback port, for tests (not a test module).

Usage::

    from tests.sshd import Sshd, require_sshd

    @pytest.fixture
    def sshd(tmp_path):
        require_sshd()                          # skips the test, with the reason, without OpenSSH
        with Sshd(tmp_path / "sshd") as server:  # keys generated, server started; stopped on exit
            yield server

    server.port         # the TCP port on 127.0.0.1
    server.user         # the user to log in as: the one running the tests
    server.identity     # the client's private key (ed25519, no passphrase)
    server.known_hosts  # a known_hosts file holding the server's host key
    server.url("/opt/edge-sdk")  # "ssh://USER@127.0.0.1:PORT/opt/edge-sdk"
    server.stop()       # terminate and wait; start() again keeps the port and the keys

The server logs in only with ``identity`` (no passwords, no keyboard-interactive), does no DNS
lookups and logs to ``directory/sshd.log``. Remote commands run in sshd's own environment: the
default PATH, not this virtual environment, so name the remote ``edge-sdk`` explicitly, e.g.
``f"{sys.executable} -m edge_sdk.cli"``. Without PAM, sshd refuses an account whose password
field is locked (``!`` in /etc/shadow). CI installs the server with
``apt-get install openssh-server openssh-client rsync``.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.services import free_port, start_listener, stop_process

__all__ = ["Sshd", "require_sshd", "sshd_binary"]

_SSHD = "/usr/sbin/sshd"  # sshd refuses to start unless run by an absolute path


def sshd_binary() -> str | None:
    """The sshd executable (Debian's /usr/sbin, then PATH, as an absolute path), or None."""
    if os.access(_SSHD, os.X_OK):
        return _SSHD
    found = shutil.which("sshd")
    return os.path.abspath(found) if found else None


def require_sshd() -> str:
    """The sshd executable; skips the calling test when sshd, ssh or ssh-keygen is missing."""
    binary = sshd_binary()
    missing = [name for name, found in (("sshd", binary), ("ssh", shutil.which("ssh")),
                                         ("ssh-keygen", shutil.which("ssh-keygen"))) if not found]
    if missing or binary is None:
        pytest.skip(f"needs OpenSSH ({', '.join(missing)} not found; "
                    "apt-get install openssh-server openssh-client)")
    return binary


def _keygen(path: Path) -> None:
    """An ed25519 key pair at ``path`` and ``path.pub``, no passphrase."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edge-sdk-tests", "-f", str(path)],
                   check=True, capture_output=True)


class Sshd:
    """One sshd process with its host key, client key, config and log under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        self.identity = self.directory / "client_key"
        self.known_hosts = self.directory / "known_hosts"
        self.log = self.directory / "sshd.log"
        self._host_key = self.directory / "host_key"
        self._config = self.directory / "sshd_config"
        self._process: subprocess.Popen[bytes] | None = None
        self._write_files()

    def url(self, path: str) -> str:
        """The ``--to`` value reaching ``path`` on this server."""
        return f"ssh://{self.user}@127.0.0.1:{self.port}/{path.lstrip('/')}"

    def _write_files(self) -> None:
        _keygen(self._host_key)
        _keygen(self.identity)
        authorized = self.directory / "authorized_keys"
        authorized.write_text(self.identity.with_suffix(".pub").read_text())
        key_type, key = self._host_key.with_suffix(".pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {key_type} {key}\n")
        self._config.write_text("\n".join([
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {self._host_key}",
            f"AuthorizedKeysFile {authorized}",
            f"PidFile {self.directory / 'sshd.pid'}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "StrictModes no",  # tmp_path and its parents need not be owned by the user
            "UsePAM no",
            "UseDNS no",
            "LogLevel VERBOSE",
            "Subsystem sftp internal-sftp",
        ]) + "\n")

    def start(self, timeout: float = 5.0) -> Sshd:
        """Start sshd and wait until it accepts connections."""
        binary = sshd_binary()
        if binary is None:
            raise RuntimeError("sshd is not installed (apt-get install openssh-server)")
        if os.geteuid() == 0:  # the privilege separation directory; a container has no systemd to make it
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        self._process = start_listener([binary, "-D", "-e", "-f", str(self._config)], self.port, self.log, "sshd", timeout)
        return self

    def stop(self) -> None:
        """Terminate the listener and wait for it (open sessions are ended by their own processes)."""
        stop_process(self._process)
        self._process = None

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
