"""A real mosquitto broker on a free loopback port, for tests (not a test module).

Usage::

    from tests.broker import Mosquitto, require_mosquitto

    @pytest.fixture
    def broker(tmp_path):
        require_mosquitto()                      # skips the test, with the reason, without the binary
        with Mosquitto(tmp_path / "broker") as b:  # started; stopped on exit
            yield b

    b.port        # the TCP port on 127.0.0.1 (kept across restart())
    b.stop()      # terminate and wait: clients see the connection drop
    b.start()     # again, same port
    b.restart()   # stop() + start()
    b.signal(signal.SIGSTOP)  # freeze it: connections stay open and nothing is answered

``persistent=True`` keeps sessions and queued messages across restarts (mosquitto saves them
on SIGTERM), so a subscriber with ``clean_session=False`` misses nothing while the broker is
down. ``allow_anonymous=False`` with no password file refuses every client. ``config`` adds
mosquitto.conf lines, e.g. ``("max_packet_size 4096",)``: mosquitto then drops a client that sends
a bigger packet.
CI installs the broker with ``apt-get install mosquitto`` (see .ci/run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import pytest

from tests.services import free_port, start_listener, stop_process

__all__ = ["Mosquitto", "mosquitto_binary", "require_mosquitto"]


def mosquitto_binary() -> str | None:
    """The mosquitto executable (PATH, then Debian's /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def require_mosquitto() -> str:
    """The mosquitto executable; skips the calling test when it is not installed."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("needs the mosquitto MQTT broker (apt-get install mosquitto)")
    return binary


class Mosquitto:
    """One mosquitto process with its config, log and (optional) persistence under ``directory``."""

    def __init__(self, directory: Path, *, persistent: bool = False, allow_anonymous: bool = True,
                 config: Sequence[str] = ()) -> None:
        self.directory = Path(directory)
        self.port = free_port()
        self.log = self.directory / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._config = self.directory / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", f"allow_anonymous {str(allow_anonymous).lower()}",
                 f"persistence {str(persistent).lower()}", "log_type all"]
        if persistent:
            lines.append(f"persistence_location {self.directory}/")
        if os.geteuid() == 0:  # as root mosquitto would switch to user "mosquitto" and lose access here
            lines.append("user root")
        lines += config
        self._config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 5.0) -> Mosquitto:
        """Start the broker and wait until it accepts connections."""
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self._process = start_listener([binary, "-c", str(self._config)], self.port, self.log, "mosquitto", timeout)
        return self

    def stop(self) -> None:
        """Terminate the broker (SIGTERM: persistence is saved) and wait for it to exit."""
        stop_process(self._process)
        self._process = None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the running broker (SIGSTOP / SIGCONT / SIGKILL)."""
        if self._process is None:
            raise RuntimeError("the broker is not running")
        self._process.send_signal(signum)

    def restart(self) -> Mosquitto:
        self.stop()
        return self.start()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
