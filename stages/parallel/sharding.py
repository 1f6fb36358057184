"""Which slice of the Llama model each tensor-parallel rank holds (Megatron-style).

- Attention: whole grouped-query groups per rank. With N ranks and Hk KV
  heads, N <= Hk splits the KV heads into N contiguous runs as evenly as they
  go (SmolLM2's 3 over 2 ranks: [2, 1]) and each rank takes the query heads
  of its KV heads ([6, 3] of 9), so heads need not divide evenly. N > Hk
  replicates: each KV head goes to a run of ranks that split its query heads
  among them, each holding (and caching) that one KV head. q/k/v rows are
  column-parallel; o_proj's input columns follow the query heads.
- MLP: gate/up rows (column-parallel) and down_proj's columns (row-parallel)
  by contiguous runs of the intermediate axis.
- Vocabulary: contiguous runs of ceil(V / N) rows of the embedding and LM
  head, the last one padded with zero rows so every rank's logits have one
  width for the all-gather; the padding columns are dropped after it.
Row-parallel outputs (o_proj, down_proj, the masked embedding lookup) are
summed over the ranks by one all-reduce each.

Pure Python: the loader and the KV sizing use it without a framework.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import LlamaConfig


@dataclass(frozen=True, slots=True)
class Shard:
    """This process's place in the tensor-parallel group."""

    rank: int
    size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in a group of {self.size}")


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """The global indices one rank holds."""

    rank: int
    size: int
    q_heads: range
    kv_heads: range  # replicated heads included
    intermediate: range  # gate/up rows, down_proj columns
    vocab: range  # real vocabulary rows of the embedding and LM head
    vocab_rows: int  # rows of each rank's embedding/head: len(vocab) plus zero padding

    @property
    def vocab_padding(self) -> int:
        """Zero rows after this rank's vocabulary rows."""
        return self.vocab_rows - len(self.vocab)

    @property
    def gathered_vocab(self) -> int:
        """Columns of the all-gathered logits: every rank's vocab_rows, padding included."""
        return self.vocab_rows * self.size


def even_split(n: int, parts: int) -> list[range]:
    """n items in `parts` contiguous runs whose lengths differ by at most one, longer first."""
    base, extra = divmod(n, parts)
    out, at = [], 0
    for i in range(parts):
        length = base + (1 if i < extra else 0)
        out.append(range(at, at + length))
        at += length
    return out


def plan_shard(config: LlamaConfig, shard: Shard) -> ShardPlan:
    hq, hk, size, rank = config.num_attention_heads, config.num_key_value_heads, shard.size, shard.rank
    if size > hq:
        raise ValueError(f"tensor_parallel_size {size} exceeds the model's {hq} attention heads "
                         "(every rank needs at least one)")
    group = hq // hk  # query heads per KV head
    if size <= hk:
        kv = even_split(hk, size)[rank]
        q = range(kv.start * group, kv.stop * group)
    else:
        owners = even_split(size, hk)  # the run of ranks sharing each KV head
        head = next(k for k, ranks in enumerate(owners) if rank in ranks)
        ranks = owners[head]
        # len(ranks) <= ceil(size / hk) <= group because size <= hq: every rank gets a query head
        part = even_split(group, len(ranks))[rank - ranks.start]
        kv = range(head, head + 1)
        q = range(head * group + part.start, head * group + part.stop)
    rows = -(-config.vocab_size // size)
    vocab = range(min(config.vocab_size, rank * rows), min(config.vocab_size, (rank + 1) * rows))
    return ShardPlan(rank, size, q, kv, even_split(config.intermediate_size, size)[rank], vocab, rows)


def max_kv_heads_per_rank(config: LlamaConfig, size: int) -> int:
    """The most KV heads one rank caches: what sizes each rank's KV blocks."""
    if size == 1:
        return config.num_key_value_heads
    return max(len(plan_shard(config, Shard(r, size)).kv_heads) for r in range(size))


_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def take(plan: ShardPlan, config: LlamaConfig, hf_name: str, a):  # a: numpy array or framework tensor
    """The rank's slice of the Hugging Face tensor `hf_name` (basic slicing only,
    so numpy arrays and framework tensors alike give views). The vocabulary
    tensors still lack their `plan.vocab_padding` zero rows."""
    d = config.head_dim
    q, kv, i = plan.q_heads, plan.kv_heads, plan.intermediate
    if hf_name in _VOCAB:
        return a[plan.vocab.start: plan.vocab.stop]
    part = hf_name.rsplit(".", 2)[-2]  # model.layers.N.self_attn.q_proj.weight -> q_proj
    if part == "q_proj":
        return a[q.start * d: q.stop * d]
    if part in ("k_proj", "v_proj"):
        return a[kv.start * d: kv.stop * d]
    if part == "o_proj":
        return a[:, q.start * d: q.stop * d]
    if part in ("gate_proj", "up_proj"):
        return a[i.start: i.stop]
    if part == "down_proj":
        return a[:, i.start: i.stop]
    return a  # norms: every rank holds them whole


def padding_rows(plan: ShardPlan, hf_name: str) -> int:
    """Zero rows appended to the rank's slice of `hf_name` (the vocabulary tensors' last shard)."""
    return plan.vocab_padding if hf_name in _VOCAB else 0


__all__ = ["Shard", "ShardPlan", "even_split", "max_kv_heads_per_rank", "padding_rows", "plan_shard", "take"]
