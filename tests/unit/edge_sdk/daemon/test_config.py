"""The daemon's TOML configuration: defaults, secrets from files, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.daemon.config import ConfigError, DaemonConfig

TOKEN = "0123456789abcdef0123"
BASE = f"""
[server]
token = "{TOKEN}"
[models.defects]
package = "defects.edgepkg"
[storage]
dir = "state"
"""


def load(tmp_path: Path, text: str) -> DaemonConfig:
    path = tmp_path / "edge-sdk.toml"
    path.write_text(text)
    return DaemonConfig.load(path)


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    config = load(tmp_path, BASE)
    assert config.server.host == "127.0.0.1" and config.server.port == 8080  # loopback unless configured
    assert config.server.max_body_bytes == 16 * 1024 * 1024
    assert config.models["defects"].package == tmp_path / "defects.edgepkg"
    assert config.storage.dir == tmp_path / "state" and config.storage.max_age_s == 30 * 86400
    assert config.mqtt is None and config.fusion is None and not config.sources
    assert TOKEN not in repr(config)  # the token is never printed


def test_secrets_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "mqtt-pass").write_text("s3cret\n")
    text = BASE.replace(f'token = "{TOKEN}"', 'token_file = "token"') + """
[mqtt]
host = "broker.local"
password_file = "mqtt-pass"
username = "edge"
"""
    config = load(tmp_path, text)
    assert config.server.token == TOKEN and config.mqtt is not None and config.mqtt.password == "s3cret"
    assert config.mqtt.device_id and config.mqtt.prefix == "edge-sdk" and "s3cret" not in repr(config)


def test_sources_fusion_and_events(tmp_path: Path) -> None:
    config = load(tmp_path, BASE + """
[sources.cam0]
uri = 0
model = "defects"
asset = "press-4"
policy = "latest"
max_fps = 5
rois = { left = [0, 0, 320, 240], right = [320, 0, 320, 240] }
assets = { left = "press-4-left" }
[sources.trigger]
uri = "rtsp://10.0.0.9/line2"
model = "defects"
stall_timeout = 0
[fusion]
faults = ["none", "surface_defect"]
[fusion.models.defects]
map = { scratch = "surface_defect", "*" = "none" }
[events]
faults = ["surface_defect"]
cooldown_s = 5
""")
    cam = config.sources["cam0"]
    assert cam.uri == 0 and cam.asset_of("left") == "press-4-left" and cam.asset_of("right") == "press-4"
    assert cam.asset_of(None) == "press-4"
    assert cam.source_options() == {} and config.sources["trigger"].source_options() == {"stall_timeout": None}
    assert config.events.matches("surface_defect", True, 0.9) and not config.events.matches("leak", True, 0.9)
    assert not config.events.matches("surface_defect", True, 0.2)


@pytest.mark.parametrize("extra, match", [
    ("[srever]\nport = 1\n", r"unknown section\(s\) \['srever'\]"),
    ("[pipeline]\nmax_batch = 0\n", "pipeline.max_batch is 0; expected an int 1-1024"),
    ("[sources.cam0]\nuri = 'x.mp4'\nmodel = 'nope'\n", r"sources.cam0.model is 'nope'; expected one of the configured"),
    ("[sources.cam0]\nuri = 'x.mp4'\nmodel = 'defects'\nassets = { left = 'a' }\n", "does not declare"),
    ("[events]\nmin_confidence = 2\n", r"events.min_confidence is 2; expected a number in \[0, 1\]"),
    ("[mqtt]\nport = 1883\n", "mqtt has no host"),
    ("[mqtt]\nhost = 'b'\nprefix = 'a/#'\n", "without # or +"),
    ("[fusion]\nfaults = ['none', 'leak']\n[fusion.models.defects]\nmap = { scratch = 'crack' }\n", "map.scratch"),
    ("[storage]\nmax_mb = -1\n", ""),
    ("[sources.cam0]\nuri = 'x.mp4'\nmodel = 'defects'\nasset = \"press\\n4\"\n", r"sources.cam0.asset is 'press\\n4'"),
    ("[sources.cam0]\nuri = 'rtsp://c/x'\nmodel = 'defects'\nstall_timeout = -1\n",
     r"sources.cam0.stall_timeout is -1; expected seconds >= 0"),
    ("[sources.cam0]\nuri = 'x.mp4'\nmodel = 'defects'\nrois = { l = [0, 0, 1, 1] }\nassets = { l = 'a\\u0085' }\n",
     "sources.cam0.assets"),
])
def test_bad_values_name_their_key(tmp_path: Path, extra: str, match: str) -> None:
    text = BASE + extra if "[storage]" not in extra else BASE.replace('[storage]\ndir = "state"\n', extra)
    with pytest.raises(ConfigError, match=match or "storage.max_mb is -1"):
        load(tmp_path, text)


def test_server_limits_have_defaults_and_are_checked(tmp_path: Path) -> None:
    s = load(tmp_path, BASE).server
    assert (s.header_timeout_s, s.body_timeout_s, s.idle_timeout_s, s.shutdown_grace_s) == (10, 60, 5, 10)
    assert (s.max_connections, s.max_in_flight, s.model_dirs) == (512, 16, ())
    text = BASE.replace("[server]\n", "[server]\nmax_in_flight = 4\nmodel_dirs = ['pkgs', '/opt/x']\n")
    s = load(tmp_path, text).server
    assert s.max_in_flight == 4 and s.model_dirs == (tmp_path / "pkgs", Path("/opt/x"))
    for line, match in (("max_in_flight = 0", "server.max_in_flight is 0; expected an int >= 1"),
                        ("header_timeout_s = -1", "server.header_timeout_s is -1; expected seconds > 0"),
                        ("shutdown_grace_s = 'long'", "server.shutdown_grace_s is 'long'"),
                        ("model_dirs = 'pkgs'", "server.model_dirs is 'pkgs'; expected a list of directory paths")):
        with pytest.raises(ConfigError, match=match):
            load(tmp_path, BASE.replace("[server]\n", f"[server]\n{line}\n"))


def test_token_is_required_and_long(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="token is missing or shorter than 16") as info:
        load(tmp_path, BASE.replace(TOKEN, "short"))
    assert "openssl rand" in (info.value.hint or "")
    with pytest.raises(ConfigError, match="token_file 'missing' cannot be read"):
        load(tmp_path, BASE.replace(f'token = "{TOKEN}"', 'token_file = "missing"'))


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        DaemonConfig.load(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path, "[server\n")
    with pytest.raises(ConfigError, match=r"no \[models.NAME\] table"):
        load(tmp_path, f'[server]\ntoken = "{TOKEN}"\n')


def test_a_token_file_with_a_second_line_is_refused_and_a_world_readable_one_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It used to start and report ready, then reject every client (the token held the newline)."""
    text = BASE.replace(f'token = "{TOKEN}"', 'token_file = "token"')
    (tmp_path / "token").write_text(TOKEN + "\nsecond line\n")
    with pytest.raises(ConfigError, match="server.token_file 'token' holds 2 lines or control characters"):
        load(tmp_path, text)
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "token").chmod(0o644)
    with caplog.at_level("WARNING", logger="edge_sdk.daemon.config"):
        assert load(tmp_path, text).server.token == TOKEN
    assert "is readable by every user (mode 644); chmod 600 it" in caplog.text
    (tmp_path / "token").chmod(0o600)
    caplog.clear()
    with caplog.at_level("WARNING", logger="edge_sdk.daemon.config"):
        load(tmp_path, text)
    assert "readable by every user" not in caplog.text


def test_listening_beyond_loopback_is_warned_about() -> None:
    from edge_sdk.daemon.server import bind_warning

    assert bind_warning("127.0.0.1") is None and bind_warning("::1") is None and bind_warning("127.0.0.2") is None
    assert "serving plain HTTP on 0.0.0.0" in (bind_warning("0.0.0.0") or "")
    assert "TLS reverse proxy" in (bind_warning("10.1.2.3") or "")
