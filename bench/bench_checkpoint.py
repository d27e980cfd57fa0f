#!/usr/bin/env python
"""What an evaluation's checkpoints cost when the disk is slow, under each checkpoint policy.

The ``"t4"`` preset's model and optimizer state (Muon + AdamW, after one step) are saved with
``slm_utils.save_checkpoint`` exactly as ``train()`` saves them, to a writer held at
``--mb-s`` MB/s: ``slm_utils._atomic_write`` is wrapped so each chunk sleeps as long as that rate
needs (Google Drive, as Colab mounts it, writes at tens of MB/s). Three policies:

- ``pair``: the old one: ``last.pt`` and ``best.pt``, the same full bytes, at every improving evaluation;
- ``weights-only best``: ``best.pt`` holds the weights only (``best_weights_only=True``), ``last.pt``
  stays full, both at every improving evaluation;
- the same with ``last_every_s``: an evaluation that is not due writes ``best.pt`` alone;
- ``background_checkpoints``: the state is copied to the CPU in the training thread, and serialized
  and written by a ``CheckpointWriter`` thread; what training waits for is the copy alone.

    python bench/bench_checkpoint.py [--mb-s 30] [--preset t4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import slm_utils as S  # noqa: E402
from common import machine_info, machine_line, time_call  # noqa: E402


def throttled(rate_bytes_s: float):
    real = S._atomic_write

    def write(path, *chunks):
        start, size = time.perf_counter(), sum(len(memoryview(c)) for c in chunks)
        real(path, *chunks)
        time.sleep(max(0.0, size / rate_bytes_s - (time.perf_counter() - start)))  # hold the rate
    return real, write


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb-s", type=float, default=30.0)
    ap.add_argument("--preset", default="t4")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model_cfg, cfg = S.preset(args.preset)
    model = S.GPT(model_cfg)
    optimizer = S.configure_optimizer(model, cfg, "cpu")
    for p in model.parameters():  # one step, so every optimizer state tensor exists, as mid-run
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    history = {"step": list(range(1000)), "val_loss": [5.0] * 20}
    print(machine_line(machine_info()))
    real, slow = throttled(args.mb_s * 1e6)
    S._atomic_write = slow
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)

            def timed(fn):
                return time_call(fn, "cpu")

            full = dict(step=1000, train_config=cfg, history=history)
            pair = timed(lambda: S.save_checkpoint(out / "last.pt", model, optimizer, None, copies=[out / "best.pt"], **full))
            last = timed(lambda: S.save_checkpoint(out / "last.pt", model, optimizer, None, **full))
            best = timed(lambda: S.save_checkpoint(out / "best.pt", model, **full))
            sizes = {n: (out / n).stat().st_size / 1e6 for n in ("last.pt", "best.pt")}
            writer = S.CheckpointWriter()
            stall = timed(lambda: (S.save_checkpoint(out / "best.pt", model, writer=writer, **full),
                                   S.save_checkpoint(out / "last.pt", model, optimizer, None, writer=writer, **full)))
            behind = timed(writer.wait)
            writer.close()
    finally:
        S._atomic_write = real
    print(f"preset {args.preset!r}: last.pt {sizes['last.pt']:.0f} MB (weights + optimizer state), "
          f"best.pt {sizes['best.pt']:.0f} MB (weights only); writer held at {args.mb_s:g} MB/s")
    print(f"  pair (old: two full files)        {pair:6.1f} s per improving evaluation")
    print(f"  weights-only best + full last     {best + last:6.1f} s")
    print(f"  weights-only best alone (timer)   {best:6.1f} s when last.pt is not due")
    print(f"  background (weights-only best + full last): training waits {stall:5.1f} s (the copy); "
          f"{behind:.1f} s more of writing overlaps with training")
    evals, steps = cfg.max_steps // cfg.eval_interval, cfg.max_steps
    print(f"  a {steps}-step run with {evals} evaluations, all improving: {evals * pair / 60:.1f} min (pair), "
          f"{evals * (best + last) / 60:.1f} min (weights-only best), "
          f"{(evals * best + 5 * last) / 60:.1f} min (weights-only best, last.pt 5 times: last_every_s=300 over ~25 min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
