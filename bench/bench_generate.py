"""Section "generate": greedy generation tokens/s on the CPU, with and without the KV cache.

The seed-shape model (6/6/384, vocab 50,257, block 128), freshly initialised (speed does not
depend on the weights), batch 1, greedy, 512 new tokens after a short prompt. 512 tokens is
past the 128-token context, so the window hops forward by 64 tokens at a time
(slm_utils.context_start) and the cache is rebuilt once per hop. Runs alternate between
the two modes; the median run counts. The plain reference's generate (every token re-reads
the last 128 tokens and computes all their logits, as a first notebook does) is timed too,
with the same weights (skip it with --skip-reference-generate).

The same pair is also timed for the seed's own model config, whose position table has 512 rows
(``--gen-block-sizes``, default "128,512"): there 512 new tokens never leave the context, so
every uncached token re-reads a context that grows to 523 tokens, which is what the cache is for.
"""

from __future__ import annotations

import time

import torch

import bench_train
import common
import reference_gpt as ref
import slm_utils as S

PROMPT = "HAMLET.\nTo be, or not to be"


def _time_pair(shape: dict, prompt: torch.Tensor, new: int, repeats: int):
    """Median seconds for greedy generation with and without the cache, and whether they agree."""
    torch.manual_seed(0)
    model = S.GPT(S.GPTConfig(**shape)).to(torch.device("cpu")).eval()

    def gen(use_cache):
        return model.generate(prompt, new, temperature=0.0, use_kv_cache=use_cache)

    gen(True)  # warm-up: allocator, thread pool
    times = {"no_cache": [], "kv_cache": []}
    outputs = {}
    for r in range(repeats):
        for mode, use_cache in (("no_cache", False), ("kv_cache", True)):
            t0 = time.perf_counter()
            outputs[mode] = gen(use_cache)
            times[mode].append(time.perf_counter() - t0)
            common.log(f"  block {shape['block_size']}, run {r + 1}: {mode} {times[mode][-1]:.2f} s")
    return model, times, torch.equal(outputs["no_cache"], outputs["kv_cache"])


def run(args, device) -> dict:
    base = bench_train.SHAPES[args.shape]
    new = args.new_tokens
    repeats = args.repeats or (1 if args.quick else 3)
    with_reference = not args.skip_reference_generate
    block_sizes = [int(b) for b in str(getattr(args, "gen_block_sizes", "") or base["block_size"]).split(",")]
    prompt = torch.tensor([S.get_tokenizer().encode_ordinary(PROMPT)], dtype=torch.long)
    common.log(f"[generate] {new} new tokens after a {prompt.size(1)}-token prompt, {repeats} repeat(s), "
               f"{torch.get_num_threads()} threads, model block sizes {block_sizes}")

    rows, goals, speedups, all_identical = [], [], {}, True
    for block_size in block_sizes:
        shape = {**base, "block_size": block_size}
        model, times, identical = _time_pair(shape, prompt, new, repeats)
        all_identical &= identical
        pair = []
        for mode, label in (("no_cache", "no KV cache"), ("kv_cache", "KV cache")):
            st = common.summarize_times(times[mode])
            pair.append({"name": f"slm_utils, block {block_size}, {label}", "block_size": block_size,
                         "tokens_per_s": new / st["median_s"], "seconds": st["median_s"],
                         "runs": st["n"], "min_s": st["min_s"], "max_s": st["max_s"]})
        speedup = pair[1]["tokens_per_s"] / pair[0]["tokens_per_s"]
        speedups[block_size] = speedup
        pair[0]["vs_no_cache"], pair[1]["vs_no_cache"] = 1.0, speedup
        label = "the seed's model config" if block_size == 512 else "the trained context"
        goals.append(common.goal_row(f"KV cache speedup over slm_utils without it, block {block_size} ({label}), "
                                     f"{new} tokens, CPU, batch 1", f"{speedup:.1f}x", ">= 5x", speedup >= 5))
        if with_reference and block_size == base["block_size"]:
            plain = ref.load_from_slm(ref.ReferenceGPT(ref.RefConfig.like(model.config)), model).eval()
            plain.generate(prompt, 8)
            ref_times = []
            for r in range(repeats):
                t0 = time.perf_counter()
                plain.generate(prompt, new)
                ref_times.append(time.perf_counter() - t0)
                common.log(f"  run {r + 1}: reference {ref_times[-1]:.2f} s")
            st = common.summarize_times(ref_times)
            pair.insert(0, {"name": f"plain reference, block {block_size} (window slides every token)",
                            "block_size": block_size, "tokens_per_s": new / st["median_s"],
                            "seconds": st["median_s"], "runs": st["n"], "min_s": st["min_s"], "max_s": st["max_s"],
                            "vs_no_cache": (new / st["median_s"]) / pair[0]["tokens_per_s"]})
            vs_plain = pair[-1]["tokens_per_s"] / pair[0]["tokens_per_s"]
            pair[-1]["vs_plain_reference"] = vs_plain
            goals.append(common.goal_row(f"KV cache speedup over the plain reference's generate, block {block_size}, "
                                         f"{new} tokens", f"{vs_plain:.1f}x", ">= 5x", vs_plain >= 5))
        rows.extend(pair)
    goals.append(common.goal_row("cached and uncached tokens identical (greedy)", all_identical, "yes", all_identical))
    result = {
        "section": "generate",
        "settings": {"shape": args.shape, **base, "block_sizes": block_sizes, "new_tokens": new,
                     "prompt_tokens": prompt.size(1), "batch": 1, "greedy": True, "repeats": repeats,
                     "device": "cpu", "threads": torch.get_num_threads()},
        "rows": rows, "speedup": speedups, "identical_tokens": all_identical, "goals": goals,
    }
    cols = [("name", "generator"), ("tokens_per_s", "tokens/s"), ("seconds", f"s per {new} tokens (median)"),
            ("runs", "runs"), ("vs_no_cache", "x slm_utils no-cache"), ("vs_plain_reference", "x plain reference")]
    result["markdown"] = "\n".join([
        f"Generation on the CPU ({torch.get_num_threads()} threads): {args.shape} shape at model block sizes "
        f"{', '.join(map(str, block_sizes))}, batch 1, greedy, {new} new tokens after a {prompt.size(1)}-token prompt; "
        f"median of {repeats} run(s). slm_utils computes the 50,257-way output for the last position only, with or "
        "without the cache; the plain reference computes it for every position of its window, every token.", "",
        common.markdown_table(rows, cols), "",
        "KV cache speedup over slm_utils without it: "
        + ", ".join(f"{v:.1f}x at block {k}" for k, v in speedups.items())
        + f"; identical tokens with and without the cache: {'yes' if all_identical else 'no'}.", "",
        common.markdown_table(goals, common.GOAL_COLUMNS)])
    return result
