#!/usr/bin/env python
"""Training tokens/s of 1 process against N processes under torchrun, at the same global batch.

Each run is ``python slm_utils.py train`` (or the same under ``torchrun --nproc_per_node=N``) of
the ``"cpu"`` preset with 2 micro-batches of 8 windows per step (one per process at N = 2), so
every run trains on exactly the same windows. The rate is the one ``train()`` records in the
checkpoint's history: tokens over training time, evaluations and checkpoints included. On a CPU
the processes share the same cores, so little gain is expected; on a machine with several GPUs
pass ``--device cuda`` to see DDP's scaling.

    python bench/bench_ddp.py [--procs 1 2] [--steps 60] [--device cpu] [--out bench/results/ddp.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import slm_utils as S  # noqa: E402
from common import machine_info, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(procs: int, data_dir: Path, out_dir: Path, steps: int, device: str, threads: int) -> dict:
    sets = {"max_steps": steps, "batch_size": 8, "grad_accum_steps": 2, "eval_interval": steps,
            "curriculum_steps": 0, "device": device}
    args = ["train", "--preset", "cpu", "--data-dir", str(data_dir), "--out-dir", str(out_dir)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]  # a bare word such as cpu stays a string
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--standalone", f"--nproc_per_node={procs}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run([*launcher, str(ROOT / "slm_utils.py"), *args], check=True, env=env, capture_output=True)
    wall = time.perf_counter() - t0
    history = S.load_checkpoint(out_dir / "last.pt")["history"]
    return {"procs": procs, "threads_per_proc": threads, "tokens_per_s": history["tokens_per_s"],
            "train_time_s": history["train_time_s"], "wall_s": wall, "val_loss": history["val_loss"][-1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        S.prepare_data("shakespeare", data)
        rows = []
        for procs in args.procs:  # the cores are split between the processes, as torchrun would
            threads = max(1, cores // procs) if args.device == "cpu" else 1
            rows.append(run(procs, data, Path(tmp) / f"run{procs}", args.steps, args.device, threads))
            r = rows[-1]
            print(f"{procs} process(es) x {threads} thread(s): {r['tokens_per_s']:,.0f} tokens/s, "
                  f"train {r['train_time_s']:.1f} s, wall {r['wall_s']:.1f} s, val {r['val_loss']:.4f}", flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows[1:]:
        print(f"{r['procs']} processes: {r['tokens_per_s'] / base:.2f}x the rate of {rows[0]['procs']}")
    info = machine_info()
    print(machine_line(info))
    result = {"machine": info, "rows": rows,
              "command": "python bench/bench_ddp.py " + " ".join(argv or sys.argv[1:])}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
