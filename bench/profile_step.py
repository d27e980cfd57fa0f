#!/usr/bin/env python
"""Where one optimizer step's time goes on a GPU: kernel time against wall time, eager and compiled.

The projection (``bench/project_gpu.py``) splits a step into GPU time and the CPU's time to launch
its kernels, and its compiled figures came out 44-55% optimistic on an H200, calibrated
(BENCHMARKS.md section 8). Step time alone cannot say which part it gets wrong; a profile can. For each mode this script
trains a preset's step (``bench/bench_microbatch.make_step``: the preset's model, optimizer, dtype and
``slm_utils.train_step``) a few times under ``torch.profiler`` and records, per step:

- ``wall_ms``: the step's wall time under the profiler, synchronized (``wall_ms_unprofiled``: the
  same number of steps just before, without it; the profiler's own overhead is the difference);
- ``kernel_ms``: the sum of the GPU kernels' own times (memory copies and sets apart, in ``copy_ms``);
- ``gpu_busy``: kernel_ms / wall_ms; far below 1 means the GPU waits for the CPU;
- ``kernels``: kernel launches, the count the projection prices;
- ``optimizer_ms``: the CPU time inside ``optimizer.step`` (Muon and AdamW), and its kernels;
- the ten kernels with the most time.

    python bench/profile_step.py --device cuda --out prof.json                     # "t4" preset, 64 x 2
    python bench/profile_step.py --device cuda --micro-batch 128 --modes compiled --out prof.json
    python bench/profile_step.py --device cpu --tiny --steps 1 --out /tmp/prof.json   # plumbing only
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository root on sys.path)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import slm_utils as S  # noqa: E402
from bench_microbatch import make_step  # noqa: E402


def _device_time_us(event) -> float:
    # renamed across PyTorch versions (cuda_time_total -> device_time_total); self time, not nested
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def _is_launch(name: str) -> bool:  # the runtime call that starts a kernel or a graph
    return "LaunchKernel" in name or "LaunchCooperativeKernel" in name or name.endswith("GraphLaunch")


def _is_annotation(event, ranges: set[str]) -> bool:
    """A record_function range (ours, torch.optim's, compile's) mirrored on the GPU's timeline: it spans
    the kernels it launched, so counting it would count them twice."""
    return (getattr(event, "is_user_annotation", False) or getattr(event, "activity_type", None) == "gpu_user_annotation"
            or event.name in ranges)


def _inside(event, name: str) -> bool:
    parent = getattr(event, "cpu_parent", None)
    while parent is not None:
        if parent.name == name:
            return True
        parent = getattr(parent, "cpu_parent", None)
    return False


def profile_mode(args, device, data_dir, compiled: bool) -> dict:
    step, model, opt, tcfg = make_step(args.preset, args.micro_batch, args.windows, device, data_dir,
                                       compile=compiled, loss_chunk=args.loss_chunk, tiny=args.tiny,
                                       **dict(args.set))
    inner = opt.step

    def labelled_step(*a, **k):  # the optimizer's share, as its own range in the profile
        with record_function("optimizer.step"):
            return inner(*a, **k)

    opt.step = labelled_step
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    common.sync(device)
    warmup_s = time.perf_counter() - t0
    plain = [common.time_call(step, device) for _ in range(args.steps)]  # the same steps, no profiler overhead
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    walls = []
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            walls.append(common.time_call(step, device))
    n = args.steps
    kernel_us = copy_us = 0.0
    kernels = 0
    per_kernel: dict[str, float] = {}
    opt_cpu_us, opt_kernels = 0.0, 0
    events = list(prof.events())
    # a GPU event that shares its name with a CPU event is a mirrored range, not a kernel
    ranges = {e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU:
            if e.name == "optimizer.step":
                opt_cpu_us += e.cpu_time_total
            elif _is_launch(e.name) and _inside(e, "optimizer.step"):
                opt_kernels += 1
            continue
        if e.device_type != torch.autograd.DeviceType.CUDA or _is_annotation(e, ranges):
            continue
        us = _device_time_us(e) or float(e.time_range.elapsed_us())
        if e.name.startswith(("Memcpy", "Memset")) or "memcpy" in e.name.lower():
            copy_us += us
            continue
        kernel_us += us
        kernels += 1
        per_kernel[e.name] = per_kernel.get(e.name, 0.0) + us
    wall_ms = 1e3 * sum(walls) / n
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:10]
    tokens = args.windows * tcfg.block_size
    return {"mode": "compiled" if compiled else "eager", "micro_batch": args.micro_batch,
            "grad_accum_steps": tcfg.grad_accum_steps, "loss_chunk": args.loss_chunk, "optimizer": tcfg.optimizer,
            "muon_stacked": bool(getattr(opt, "optimizers", {}).get("muon") and opt.optimizers["muon"].stack),
            "warmup_s": warmup_s, "steps": n, "wall_ms": wall_ms, "tokens_per_s": tokens / (wall_ms / 1e3),
            "wall_ms_unprofiled": 1e3 * sum(plain) / n,
            "kernel_ms": kernel_us / 1e3 / n, "copy_ms": copy_us / 1e3 / n,
            "gpu_busy": (kernel_us / 1e3 / n) / wall_ms if device.type == "cuda" else None, "kernels": kernels / n,
            "optimizer_cpu_ms": opt_cpu_us / 1e3 / n, "optimizer_kernels": opt_kernels / n,
            "top_kernels": [{"name": k[:120], "ms_per_step": us / 1e3 / n} for k, us in top]}


def main(argv=None) -> int:
    p = common.step_script_parser(__doc__)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--windows", type=int, default=None, help="windows per optimizer step (default: the preset's)")
    p.add_argument("--loss-chunk", type=int, default=0)
    p.add_argument("--modes", default="eager,compiled", help="eager, compiled or both")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="a 1-layer, 32-wide model: checks the script, measures nothing")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"eager", "compiled"}:
        p.error(f"--modes {args.modes!r}: give eager, compiled or eager,compiled")
    device = common.resolve_device(args.device)
    if args.windows is None:
        _, tcfg = S.preset(args.preset)
        args.windows = tcfg.batch_size * tcfg.grad_accum_steps
    data_dir = Path(common.bench_tmpdir("profile-data"))
    rows = []
    try:
        S.prepare_data("shakespeare", data_dir)
        for mode in modes:
            rows.append(profile_mode(args, device, data_dir, compiled=(mode == "compiled")))
            r = rows[-1]
            busy = f"{r['gpu_busy']:.0%}" if device.type == "cuda" else "n/a (no GPU)"
            common.log(f"[profile] {mode}: {r['wall_ms']:.1f} ms a step, kernels {r['kernel_ms']:.1f} ms "
                       f"({r['kernels']:.0f} launches), GPU busy {busy}; optimizer.step {r['optimizer_cpu_ms']:.1f} ms "
                       f"of CPU, {r['optimizer_kernels']:.0f} kernels")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    res = {"machine": common.machine_info(device), "preset": args.preset, "overrides": dict(args.set),
           "windows_per_step": args.windows, "tiny": args.tiny,
           "command": "python bench/profile_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "rows": rows}
    common.write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
