"""The daemon's config file: the README's example loads, mistakes are named."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from overlapd.daemon.daemon_config import ConfigError, load_daemon_config
from overlapd.daemon.serve import add_arguments

README = Path(__file__).resolve().parents[1] / "README.md"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "overlapd.toml"
    path.write_text(text)
    return str(path)


def test_the_readme_example_config_loads(tmp_path):
    example = re.search(r"```toml\n(.*?)```", README.read_text(), re.S).group(1)
    cfg = load_daemon_config(parse("--config", write(tmp_path, example)))
    assert cfg.server.allowed_uids == [1000] and cfg.server.mode == 0o660
    assert cfg.engine.max_num_seqs == 64 and cfg.pipeline.max_waiting == 256 and cfg.pipeline.overlap_depth == 3
    assert cfg.ring.capacity == 1 << 24 and not cfg.ring.backpressure


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, '[engine]\nmax_num_seqs = 4\n[pipeline]\noverlap_depth = 2\n[ring]\npath = "/dev/shm/a.ring"\n')
    cfg = load_daemon_config(parse("--config", path, "--max-num-seqs", "9", "--ring", "/dev/shm/b.ring", "--no-overlap",
                                   "--overlap-depth", "4"))
    assert cfg.engine.max_num_seqs == 9 and cfg.ring.path == "/dev/shm/b.ring" and not cfg.pipeline.overlap
    assert cfg.pipeline.overlap_depth == 4 and cfg.pipeline.max_inflight == 1  # no overlap: one step at a time


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[engine]\nmax_num_seq = 4\n", "did you mean `max_num_seqs`"),
        ("[engines]\n", "Unknown table [engines]"),
        ('[ring]\ncapacity = "big"\n', "capacity"),
        ("[pipeline\n", "not valid TOML"),
        ('[server]\nsocket_mode = "0999"\n', "socket_mode"),
        ("[pipeline]\noverlap_depth = 7\n", "overlap_depth"),
    ],
)
def test_config_mistakes_are_named(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_daemon_config(parse("--config", write(tmp_path, text)))


def test_a_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_daemon_config(parse("--config", str(tmp_path / "nope.toml")))


def test_a_bad_overlap_depth_flag_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse("--overlap-depth", "1")
    assert "--overlap-depth: must be between 2 and 4, not 1" in capsys.readouterr().err
