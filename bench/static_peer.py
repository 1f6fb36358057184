"""A compiled static-cache peer for bench/gpu.py: gpt-fast's approach, written small.

One Llama decode step over a static KV cache ([batch, kv heads, max_len, head
dim] per layer, written at the step's position), attention over the whole
cache with a causal mask row (SDPA with grouped-query heads), greedy argmax,
all compiled with torch.compile(mode="reduce-overhead", fullgraph=True), so the
step is Inductor's fused kernels replayed from a CUDA graph. Random bf16
weights drawn on the device, q/k/v and gate/up fused as gpt-fast does. It has
no scheduler, no paged cache, no host work per step: the floor a serving
engine's decode step is compared with.

    python bench/static_peer.py --model llama-3.2-1b --batch 1   # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from overlapd.stages.model.config import NAMED_SHAPES, LlamaConfig
from overlapd.stages.model.rope import cos_sin_tables


class _KV(torch.nn.Module):
    def __init__(self, shape: tuple[int, ...], dev: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, device=dev, dtype=dtype))
        self.register_buffer("v", torch.zeros(shape, device=dev, dtype=dtype))


class StaticLlama(torch.nn.Module):
    def __init__(self, c: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16,
                 device: str = "cuda") -> None:
        super().__init__()
        self.c, self.max_len = c, max_len
        dev = torch.device(device)
        g = torch.Generator(device=dev)
        g.manual_seed(0)

        def w(rows: int, cols: int, scale: float = 1.0) -> torch.nn.Parameter:
            x = torch.randn(rows, cols, generator=g, device=dev, dtype=torch.float32) * (scale / cols ** 0.5)
            return torch.nn.Parameter(x.to(dtype), requires_grad=False)

        h, kv = c.hidden_size, c.kv_size
        self.embed = w(c.vocab_size, h, h ** 0.5)
        self.head = self.embed if c.tie_word_embeddings else w(c.vocab_size, h, 3.0)
        self.wqkv = torch.nn.ParameterList([w(c.q_size + 2 * kv, h) for _ in range(c.num_hidden_layers)])
        self.wo = torch.nn.ParameterList([w(h, c.q_size) for _ in range(c.num_hidden_layers)])
        self.w13 = torch.nn.ParameterList([w(2 * c.intermediate_size, h) for _ in range(c.num_hidden_layers)])
        self.w2 = torch.nn.ParameterList([w(h, c.intermediate_size) for _ in range(c.num_hidden_layers)])
        ones = torch.ones(h, device=dev, dtype=dtype)
        self.register_buffer("norm_w", ones)
        # buffers, as gpt-fast's KVCache: cudagraphs treat them as static, so
        # the in-place cache writes do not make the compiler skip the graph
        self.caches = torch.nn.ModuleList(_KV((batch, c.num_key_value_heads, max_len, c.head_dim), dev, dtype)
                                          for _ in range(c.num_hidden_layers))
        cos, sin = cos_sin_tables(c, max_len)
        self.register_buffer("cos", torch.from_numpy(cos).to(dev))
        self.register_buffer("sin", torch.from_numpy(sin).to(dev))
        self.register_buffer("mask", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=dev)))

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x [B, H, 1, D], rotate-half convention (the HF layout our weights use)
        cos, sin = self.cos[pos].view(1, 1, 1, -1), self.sin[pos].view(1, 1, 1, -1)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids [B] (the last tokens), pos [1] (their position): the next tokens, greedy."""
        c, eps = self.c, self.c.rms_norm_eps
        b = ids.shape[0]
        hq, hk, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        x = F.embedding(ids, self.embed)  # [B, h]
        mask = self.mask[pos].view(1, 1, 1, self.max_len)
        for i in range(c.num_hidden_layers):
            h = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * self.norm_w
            q, k, v = F.linear(h, self.wqkv[i]).split([hq * d, hk * d, hk * d], dim=-1)
            q = self._rope(q.view(b, hq, 1, d), pos)
            k = self._rope(k.view(b, hk, 1, d), pos)
            cache = self.caches[i]
            cache.k.index_copy_(2, pos, k)
            cache.v.index_copy_(2, pos, v.view(b, hk, 1, d))
            a = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=mask, enable_gqa=True)
            x = x + F.linear(a.reshape(b, hq * d), self.wo[i])
            h = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * self.norm_w
            gate, up = F.linear(h, self.w13[i]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, self.w2[i])
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * self.norm_w
        return torch.argmax(F.linear(h, self.head).float(), dim=-1)


@torch.inference_mode()
def peer_bench(model_name: str, batch: int, max_len: int = 640, steps: int = 128, warmup: int = 4) -> dict:
    """A cache of `max_len` positions (gpt-fast sizes it for prompt + output and
    attends over all of it, masked); decode `steps` steps from the middle (the
    cache as a prompt would leave it, here zeros: the work is the same), timed."""
    c = NAMED_SHAPES[model_name]
    start = max(0, max_len // 2 - steps // 2 - warmup)
    torch._dynamo.reset()
    m = StaticLlama(c, batch, max_len)
    step = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(3, 30000, (batch,), device="cuda")
    pos = torch.tensor([start], device="cuda")
    t0 = time.perf_counter()
    for _ in range(warmup):  # compile, then the CUDA graph's recording runs
        ids = step(ids, pos).clone()
        pos += 1
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    t0 = time.perf_counter()
    ev[0].record()
    for i in range(steps):
        ids = step(ids, pos).clone()  # the graph's output buffer is reused on the next replay
        pos += 1
        ev[i + 1].record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    per = [a.elapsed_time(b) for a, b in zip(ev, ev[1:])]
    out = {"model": model_name, "batch": batch, "max_len": max_len, "compile_s": compile_s,
           "step_ms_p50": statistics.median(per), "step_ms_mean": wall / steps * 1e3,
           "tokens_per_s": batch * steps / wall, "torch": torch.__version__}
    del step, m
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b", choices=sorted(NAMED_SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=128)
    a = ap.parse_args()
    print(json.dumps(peer_bench(a.model, a.batch, steps=a.steps)))


if __name__ == "__main__":
    main()
