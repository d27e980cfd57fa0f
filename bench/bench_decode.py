#!/usr/bin/env python
"""Batch-1 greedy decoding, tokens/s: no cache, the KV cache, and the KV cache replayed from a CUDA graph.

``model.generate(prompt, NEW, temperature=0, ...)`` with ``use_kv_cache=False``, the default cache,
and a ``slm_utils.GraphDecoder`` (``cuda_graph=``), on the "t4" preset's model, freshly
initialised (speed does not depend on the weights; dropout is off in eval mode). Two context
lengths: the preset's 128 (512 new tokens hop the window forward 64 tokens at a time, each hop a
new prefill) and 512 (the seed's own config: 512 new tokens never leave the context, so every
uncached token re-reads a context that grows to 523 tokens, which is what the cache is for).
The three modes alternate; the median of ``--repeats`` runs counts, after one warm-up each (its
time is reported apart: for the graph mode it includes the one capture, reused by every later
run). On a CPU the "graph" mode runs the same fixed-shape steps without a graph.

    python bench/bench_decode.py --device cuda --out decode.json
    python bench/bench_decode.py --out /tmp/decode.json --new 64 --repeats 2      # CPU: a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import common  # noqa: E402
import slm_utils as S  # noqa: E402

def time_modes(block_size: int, new: int, repeats: int, device: torch.device) -> dict:
    mcfg, _ = S.preset("t4")
    torch.manual_seed(0)
    model = S.GPT(dataclasses.replace(mcfg, block_size=block_size)).to(device).eval()
    prompt = torch.tensor([S.get_tokenizer().encode("HAMLET.\nTo be, or not to be")], device=device)
    decoder = S.GraphDecoder(model, 1)  # one capture, reused by every graph run
    runs = {"no_cache": dict(use_kv_cache=False), "kv_cache": dict(cuda_graph=False), "kv_cache_cuda_graph": dict(cuda_graph=decoder)}
    outputs, first = {}, {}
    for mode, kw in runs.items():  # warm-up: allocator, kernels, the graph's capture
        first[mode] = common.time_call(lambda: outputs.__setitem__(
            mode, model.generate(prompt, new, temperature=0.0, **kw)), device)
    times = common.interleaved({m: functools.partial(model.generate, prompt, new, temperature=0.0, **kw)
                                for m, kw in runs.items()}, device, warmup=0, rounds=repeats)
    rates = {m: new / statistics.median(t) for m, t in times.items()}
    return {"block_size": block_size, "new_tokens": new, "prompt_tokens": prompt.size(1),
            "tokens_per_s": rates, "seconds": times, "first_call_seconds": first,
            "cache_over_no_cache": rates["kv_cache"] / rates["no_cache"],
            "graph_over_cache": rates["kv_cache_cuda_graph"] / rates["kv_cache"],
            "graph_over_no_cache": rates["kv_cache_cuda_graph"] / rates["no_cache"],
            "same_tokens": {m: torch.equal(outputs[m], outputs["kv_cache"]) for m in runs}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--device", default="cpu")
    p.add_argument("--new", type=int, default=512, help="new tokens per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--block-sizes", default="128,512")
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    rows = []
    for bs in (int(b) for b in args.block_sizes.split(",")):
        rows.append(time_modes(bs, args.new, args.repeats, device))
        r = rows[-1]
        common.log(f"block {bs}: " + ", ".join(f"{m} {v:,.0f} tok/s" for m, v in r["tokens_per_s"].items())
                   + f"; cache / no cache {r['cache_over_no_cache']:.2f}x, graph / cache {r['graph_over_cache']:.2f}x")
    common.write_json(args.out, {"machine": common.machine_info(device), "command": "python bench/bench_decode.py "
                                 + " ".join(sys.argv[1:] if argv is None else argv), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
