"""``[trust] keys``: public key files read and checked at load, relative to the configuration file, with
errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.daemon.config import ConfigError, DaemonConfig
from runtime.signing import generate_key_pair
from tests.unit.edge_sdk.daemon.test_config import BASE, load


def test_without_trust_no_key_is_required(tmp_path: Path) -> None:
    assert load(tmp_path, BASE).trust.keys == ()


def test_keys_are_read_relative_to_the_config_file(tmp_path: Path) -> None:
    _, line, line_id = generate_key_pair(tmp_path / "keys", "line1")
    _, release, release_id = generate_key_pair(tmp_path / "elsewhere", "release")
    config = load(tmp_path, BASE + f'[trust]\nkeys = ["keys/line1.pub", "{release}"]\n')
    assert [k.key_id for k in config.trust.keys] == [line_id, release_id]
    assert [k.source for k in config.trust.keys] == [str(line), str(release)]


@pytest.mark.parametrize("trust, message", [
    ("keys = []", r"trust.keys is \[\]; expected at least one public key file"),
    ('keys = "keys/a.pub"', "trust.keys is 'keys/a.pub'; expected a list of public key file paths"),
    ('key = "keys/a.pub"', r"trust has unknown key\(s\) \['key'\]"),
])
def test_bad_trust_tables_are_named(tmp_path: Path, trust: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, BASE + f"[trust]\n{trust}\n")


def test_a_bad_key_file_is_named_by_key_and_file(tmp_path: Path) -> None:
    private, _, _ = generate_key_pair(tmp_path / "keys", "line1")
    with pytest.raises(ConfigError, match=r"trust.keys\[1\] 'keys/missing.pub': public key file .*missing.pub"
                                          r"' cannot be read"):
        load(tmp_path, BASE + '[trust]\nkeys = ["keys/line1.pub", "keys/missing.pub"]\n')
    with pytest.raises(ConfigError, match=r"trust.keys\[0\] 'keys/line1.key': .*not an ed25519 public key") as info:
        load(tmp_path, BASE + '[trust]\nkeys = ["keys/line1.key"]\n')
    assert info.value.hint and ".pub" in info.value.hint
    assert private.is_file()


def test_a_key_listed_twice_is_refused(tmp_path: Path) -> None:
    _, pub, key_id = generate_key_pair(tmp_path / "keys", "line1")
    with pytest.raises(ConfigError, match=f"trust.keys\\[1\\] .* is key {key_id} again"):
        load(tmp_path, BASE + f'[trust]\nkeys = ["keys/line1.pub", "{pub}"]\n')


def test_without_cryptography_the_extra_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    generate_key_pair(tmp_path / "keys", "line1")
    for name in ("cryptography", "cryptography.hazmat.primitives", "cryptography.hazmat.primitives.asymmetric"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"trust.keys\[0\].*need the 'cryptography' package") as info:
        DaemonConfig.from_dict({"server": {"token": "0123456789abcdef0123"}, "models": {"m": {"package": "m"}},
                                "trust": {"keys": ["keys/line1.pub"]}}, base=tmp_path)
    assert info.value.hint == "pip install 'edge-sdk[serve]'"
