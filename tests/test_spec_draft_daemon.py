"""The draft method through the real daemon and its settings.

`overlapd serve --speculative draft --draft-model tiny` (the target itself as
its draft: every draft is accepted) on a real socket, with overlap: the
token ids equal those of the same requests with `speculative: false`, the
stats frame counts every draft accepted, and every KV block is free after.
"""

from __future__ import annotations

import concurrent.futures
import re

import pytest
from daemon_harness import serve_real
from test_spec_config import parse

from overlapd.daemon.client import Client
from overlapd.daemon.daemon_config import ConfigError, load_daemon_config

K = 3
PROMPTS = [
    [5, 6, 7, 8, 9] * 4 + [5, 6],
    list(range(3, 40)) * 2 + [3, 4],
    [21, 22, 23, 24, 25, 26, 27, 28],
]


def complete(d, prompt_ids: list[int], speculative: bool):
    with Client(d.socket_path, timeout=120) as c:
        return c.complete(prompt_ids=prompt_ids, max_tokens=32, temperature=0.0, ignore_eos=True,
                          speculative=speculative)


def test_draft_model_through_the_daemon(tmp_path):
    d = serve_real(tmp_path, "--speculative", "draft", "--draft-model", "tiny", "--num-speculative-tokens", str(K))
    try:
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            spec = list(pool.map(lambda p: complete(d, p, True), PROMPTS))
        speculated = d.stats()
        plain = [complete(d, p, False) for p in PROMPTS]
        stats = d.wait_stats(lambda s: s["live_requests"] == 0 and s["kv_blocks_used"] == 0)
        assert d.terminate() == 0
    finally:
        d.kill()
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert all(len(c.token_ids) == 32 and c.finish_reason == "length" for c in spec)
    assert speculated["spec_proposed"] > 0 and speculated["spec_acceptance_rate"] == 1.0, speculated
    assert speculated["spec_tokens_per_step"] > 2.0
    assert stats["spec_verify_rows"] == speculated["spec_verify_rows"]  # speculative: false took none
    assert stats["kv_blocks_used"] == 0
    assert '"draft_model_ready"' in d.log() and '"draft": "tiny"' in d.log()


def test_engine_keys_and_flags(tmp_path):
    path = tmp_path / "o.toml"
    path.write_text('[engine]\nspeculative = "draft"\nspeculative_draft_layers = 2\n')
    cfg = load_daemon_config(parse("--config", str(path))).engine
    assert (cfg.speculative, cfg.speculative_draft_model, cfg.speculative_draft_layers) == ("draft", "", 2)
    cfg = load_daemon_config(parse("--speculative", "draft", "--draft-model", "tiny")).engine
    assert (cfg.speculative, cfg.speculative_draft_model, cfg.speculative_draft_layers) == ("draft", "tiny", 0)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (("--speculative", "draft", "--draft-layers", "-1"), "speculative_draft_layers must be >= 0"),
        (("--speculative", "draft", "--draft-model", "tiny", "--draft-layers", "2"),
         "speculative_draft_layers (2) picks the target's own first layers as the draft; "
         "it cannot go with speculative_draft_model ('tiny')"),
    ],
)
def test_mistakes_are_named(argv, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        load_daemon_config(parse(*argv))


def test_a_config_file_mistake_is_named(tmp_path):
    path = tmp_path / "o.toml"
    path.write_text('[engine]\nspeculative = "draft"\nspeculative_draft_model = "tiny"\nspeculative_draft_layers = 1\n')
    with pytest.raises(ConfigError, match=re.escape("it cannot go with speculative_draft_model")):
        load_daemon_config(parse("--config", str(path)))
