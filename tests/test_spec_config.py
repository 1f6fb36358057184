"""Speculative decoding settings: [engine] keys and flags, mistakes named."""

from __future__ import annotations

import argparse
import re

import pytest

from overlapd.daemon.daemon_config import ConfigError, load_daemon_config
from overlapd.daemon.serve import add_arguments


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_engine_keys_and_flags(tmp_path):
    path = tmp_path / "o.toml"
    path.write_text('[engine]\nspeculative = "ngram"\nnum_speculative_tokens = 5\nspeculative_ngram_max = 4\n')
    cfg = load_daemon_config(parse("--config", str(path))).engine
    assert (cfg.speculative, cfg.num_speculative_tokens, cfg.speculative_ngram_max, cfg.speculative_ngram_min) == \
        ("ngram", 5, 4, 1)
    cfg = load_daemon_config(parse("--config", str(path), "--num-speculative-tokens", "2", "--speculative", "off")).engine
    assert (cfg.speculative, cfg.num_speculative_tokens) == ("off", 2)
    assert load_daemon_config(parse()).engine.speculative == "off"  # off unless asked for


def test_max_batch_key_and_flag(tmp_path):
    path = tmp_path / "o.toml"
    path.write_text('[engine]\nspeculative = "ngram"\nspeculative_max_batch = 8\n')
    assert load_daemon_config(parse("--config", str(path))).engine.speculative_max_batch == 8
    cfg = load_daemon_config(parse("--config", str(path), "--speculative-max-batch", "16")).engine
    assert cfg.speculative_max_batch == 16
    assert load_daemon_config(parse()).engine.speculative_max_batch == 0  # no limit unless asked for


@pytest.mark.parametrize(
    "text,needle",
    [
        ('[engine]\nspeculative = "eagle"\n', "speculative must be one of off, ngram, draft"),
        ("[engine]\nnum_speculative_tokens = 9\n", "num_speculative_tokens must be between 1 and 8"),
        ("[engine]\nnum_speculative_tokens = 0\n", "num_speculative_tokens must be between 1 and 8"),
        ("[engine]\nspeculative_ngram_min = 4\n", "speculative_ngram_min (4) and speculative_ngram_max (3)"),
        ("[engine]\nspeculative_max_batch = -1\n", "speculative_max_batch must be >= 0"),
    ],
)
def test_mistakes_are_named(tmp_path, text, needle):
    path = tmp_path / "o.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_daemon_config(parse("--config", str(path)))


def test_a_bad_flag_value_is_named():
    with pytest.raises(ValueError, match="num_speculative_tokens must be between 1 and 8, not 9"):
        load_daemon_config(parse("--speculative", "ngram", "--num-speculative-tokens", "9"))
