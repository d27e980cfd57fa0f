#!/usr/bin/env python
"""The output layer and the loss, plain against fused: time and peak memory of forward + backward.

At the "t4" preset's micro-batch (64 x 128 = 8,192 rows, 384 wide, GPT-2 vocabulary padded to
50,304) the plain head makes (8,192, 50,257) logits, an fp32 copy for the cross-entropy, and a
gradient of each. ``slm_utils.fused_linear_cross_entropy`` makes one chunk of rows at a time and
turns it into both gradients at once. Each contender runs exactly what ``GPT.forward`` runs after
the final norm: the plain path ``F.cross_entropy(lm_head(x)[..., :vocab].float(), y)``, the fused
path ``GPT.forward``'s call with ``loss_chunk`` rows.

- CUDA: autocast in the device's training dtype, times from ``torch.cuda.synchronize``,
  peak memory from ``torch.cuda.max_memory_allocated`` above what the inputs hold.
- CPU: fp32 (as ``train()`` runs there); each contender in its own process, peak memory as the
  rise of that process's maximum resident set size over its inputs.

    python bench/bench_fused_loss.py --out /tmp/fused.json                 # CPU, 2,048 rows
    python bench/bench_fused_loss.py --device cuda --rows 8192 --out fused.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
import slm_utils as S  # noqa: E402

VOCAB, PADDED = 50257, 50304


def _inputs(rows: int, width: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, width, generator=g)).to(device).requires_grad_()
    w = (torch.randn(PADDED, width, generator=g) * 0.02).to(device).requires_grad_()
    y = torch.randint(0, VOCAB, (rows,), generator=g).to(device)
    return x, w, y


def _step_fn(chunk: int, x, w, y, dtype: torch.dtype):
    device = x.device

    def step():
        with S._autocast(device, dtype):  # as train_step runs the forward
            if chunk:
                loss = S.fused_linear_cross_entropy(x, w, y, VOCAB, chunk)
            else:
                loss = F.cross_entropy(F.linear(x, w)[:, :VOCAB].float(), y)
        loss.backward()
        x.grad = w.grad = None
        return loss.detach()

    return step


def measure_one(chunk: int, rows: int, width: int, device: torch.device, dtype: torch.dtype, reps: int) -> dict:
    """Median time and peak extra memory of ``reps`` forward + backward passes of one contender."""
    x, w, y = _inputs(rows, width, device)
    step = _step_fn(chunk, x, w, y, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = step()  # the warm-up call also sets the memory high-water mark
    times = [common.time_call(step, device) for _ in range(reps)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"chunk": chunk, "median_ms": statistics.median(times) * 1e3, "times_ms": [t * 1e3 for t in times],
            "peak_extra_mb": peak / 1e6, "loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=None, help="rows (tokens) of the micro-batch (CPU 2,048; GPU 8,192)")
    p.add_argument("--width", type=int, default=384, help="n_embd (the seed's and t4's 384)")
    p.add_argument("--chunks", default="0,512,1024,2048,4096", help="rows per chunk; 0 is the plain head")
    p.add_argument("--reps", type=int, default=None, help="timed passes per contender (CPU 3, GPU 20)")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process: one contender
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    cuda = device.type == "cuda"
    rows = args.rows or (8192 if cuda else 2048)
    reps = args.reps or (20 if cuda else 3)
    dtype = S.choose_amp_dtype(device.type)
    if args.one is not None:  # the CPU child: print one JSON line
        print(json.dumps(measure_one(args.one, rows, args.width, device, dtype, reps)))
        return 0
    results = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        if cuda:
            results.append(measure_one(chunk, rows, args.width, device, dtype, reps))
            torch.cuda.empty_cache()
        else:  # a fresh process each: ru_maxrss only ever rises
            out = subprocess.run([sys.executable, __file__, "--out", "-", "--device", "cpu", "--rows", str(rows),
                                  "--width", str(args.width), "--reps", str(reps), "--one", str(chunk)],
                                 check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        common.log(f"chunk {r['chunk'] or 'plain'}: {r['median_ms']:.1f} ms, peak +{r['peak_extra_mb']:,.0f} MB, "
                   f"loss {r['loss']:.5f}")
    plain = results[0]
    for r in results:
        r["time_vs_plain"] = r["median_ms"] / plain["median_ms"]
        r["memory_vs_plain"] = r["peak_extra_mb"] / plain["peak_extra_mb"]
    res = {"machine": common.machine_info(device), "command": "python bench/bench_fused_loss.py " +
           " ".join(sys.argv[1:] if argv is None else argv), "rows": rows, "width": args.width,
           "vocab": VOCAB, "padded_vocab": PADDED, "dtype": str(dtype).replace("torch.", ""), "reps": reps,
           "results": results}
    common.write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
