"""`[http]` settings, `--http`, and the API key file: what is accepted and what is refused with a reason."""

from __future__ import annotations

import argparse
import os

import pytest

from overlapd.daemon.daemon_config import ConfigError, load_daemon_config
from overlapd.daemon.http.config import ApiKeys, HttpConfig, parse_listen
from overlapd.daemon.serve import add_arguments


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(
    ("text", "want"),
    [("8000", ("127.0.0.1", 8000)), ("0.0.0.0:80", ("0.0.0.0", 80)), ("[::1]:9000", ("::1", 9000)),
     ("localhost:0", ("localhost", 0))],
)
def test_listen_addresses(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", [":8000", "::1:8000", "host:port", "127.0.0.1:70000", ""])
def test_bad_listen_addresses_are_refused(text):
    with pytest.raises(ValueError, match="`"):
        parse_listen(text)


def test_off_by_default_and_on_from_the_file_or_the_flag(tmp_path):
    assert load_daemon_config(parse()).http.listen is None
    cfg = tmp_path / "d.toml"
    cfg.write_text('[http]\nlisten = "127.0.0.1:8100"\nmax_live = 7\n')
    from_file = load_daemon_config(parse("--config", str(cfg)))
    assert (from_file.http.listen, from_file.http.max_live) == ("127.0.0.1:8100", 7)
    flag = load_daemon_config(parse("--config", str(cfg), "--http", "9001"))
    assert (flag.http.listen, flag.http.max_live) == ("9001", 7)
    with pytest.raises(ValueError, match="port"):
        load_daemon_config(parse("--http", "127.0.0.1:http"))
    cfg.write_text('[http]\nmax_live = 0\n')
    with pytest.raises(ConfigError, match="max_live"):
        load_daemon_config(parse("--config", str(cfg)))
    cfg.write_text('[http]\nport = 80\n')
    with pytest.raises(ConfigError, match="Unknown key `port`"):
        load_daemon_config(parse("--config", str(cfg)))


def test_api_keys(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\n\nkey-one-0123456789\nkey-two-0123456789\n")
    os.chmod(path, 0o600)
    keys = ApiKeys.from_file(str(path))
    assert keys.allows("Bearer key-two-0123456789") and keys.allows("bearer key-one-0123456789")
    for header in (None, "", "Bearer", "Bearer key-one", "Basic key-one-0123456789", "key-one-0123456789"):
        assert not keys.allows(header)
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="readable by every user"):
        ApiKeys.from_file(str(path))
    path.write_text("short\n")
    os.chmod(path, 0o600)
    with pytest.raises(ValueError, match="shorter than 16"):
        ApiKeys.from_file(str(path))
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.from_file(str(path))
    with pytest.raises(ValueError, match="Cannot read"):
        ApiKeys.from_file(str(tmp_path / "missing"))
    with pytest.raises(ValueError):
        HttpConfig(listen="nope:nope")
