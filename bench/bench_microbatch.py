#!/usr/bin/env python
"""Micro-batch sweep of a preset on one device: tokens/s and peak memory, tokens per step held fixed.

The ``"t4"`` preset trains on 128 windows of 128 tokens per optimizer step, as 64 x 2 (micro-batch
x accumulation). This script times the preset's own model, optimizer (Muon + AdamW), dtype and
``slm_utils.train_step`` at other splits of the same 128 windows (16 x 8, 32 x 4, 64 x 2, 128 x 1),
so the rows differ only in how the step is cut. Each row also records the peak memory the step
holds (``torch.cuda.max_memory_allocated``: weights, optimizer state, activations), to compare with
the projection's sweep (``bench/project_gpu.py``, BENCHMARKS.md section 8) and with a T4's 15 GiB.

    python bench/bench_microbatch.py --device cuda --out mb.json
    python bench/bench_microbatch.py --device cuda --out mb.json --compiled 64:0,128:4096
    python bench/bench_microbatch.py --device cpu --tiny --micro-batches 2,4 --out /tmp/mb.json  # plumbing only

``--compiled MB:CHUNK,...`` adds ``torch.compile`` rows at those micro-batches, with the fused head
+ loss in chunks of CHUNK rows (0: the plain head). Their compile time is reported apart and not
counted in tokens/s. ``--cuda-graphs MB:CHUNK,...`` adds compiled rows whose forward and backward are
replayed from CUDA graphs (``TrainConfig.cuda_graphs``: one micro-batch per step, so MB = all the
windows). Every row runs Muon as ``configure_optimizer`` sets it for the device (on a
GPU: same-shape matrices stacked, ``TrainConfig.muon_stack``); ``--unstacked MB,MB:CHUNK,...``
adds rows with Muon one matrix at a time (``MB``: eager; ``MB:CHUNK``: compiled), to measure it.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository root on sys.path)

import torch  # noqa: E402

import slm_utils as S  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _pairs_or_eager(text: str) -> list[tuple[int, int | None]]:
    """'128,128:4096' -> [(128, None), (128, 4096)]: a bare size is an eager row, MB:CHUNK a compiled one."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        mb, sep, chunk = item.partition(":")
        out.append((int(mb), int(chunk or 0) if sep else None))
    return out


def _pairs(text: str) -> list[tuple[int, int]]:
    """'64:0,128:4096,32' -> MB:CHUNK pairs, a bare size meaning chunk 0 (the plain head)."""
    return [(mb, chunk or 0) for mb, chunk in _pairs_or_eager(text)]


def make_step(preset: str, micro_batch: int, windows: int, device: torch.device, data_dir, *, compile: bool,
              loss_chunk: int, tiny: bool, cuda_graphs: bool = False, **overrides):
    """(step, model, optimizer, train config): ``step()`` trains one optimizer step of ``windows``
    windows cut into micro-batches of ``micro_batch``, through ``slm_utils.train_step``."""
    if windows % micro_batch:
        raise SystemExit(f"--micro-batches: {micro_batch} does not divide the {windows} windows per step; "
                         "pick a divisor.")
    accum = windows // micro_batch
    shape = dict(n_layer=1, n_head=2, n_embd=32) if tiny else {}
    mcfg, tcfg = S.preset(preset, batch_size=micro_batch, grad_accum_steps=accum, device=str(device),
                          compile=compile, cuda_graphs=cuda_graphs, **{**shape, **overrides})
    torch.manual_seed(1234)
    model = S.GPT(mcfg).to(device)
    opt = S.configure_optimizer(model, tcfg, device.type)
    dtype = S._resolve_dtype(tcfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))  # as train() has it
    if compile:
        torch._dynamo.reset()  # each row compiles its own model; no reuse of another row's graphs
    fwd = S.compile_for_training(model, cuda_graphs) if compile else model
    gen = torch.Generator().manual_seed(1234)
    model.train()

    def step():
        batches = [S.get_batch(data_dir, "train", micro_batch, tcfg.block_size, device, gen) for _ in range(accum)]
        return S.train_step(fwd, opt, scaler, batches, grad_clip=tcfg.grad_clip, device=device, dtype=dtype,
                            loss_chunk=loss_chunk)

    return step, model, opt, tcfg


def measure_row(preset: str, micro_batch: int, windows: int, device: torch.device, data_dir, *, compile: bool,
                loss_chunk: int, warmup: int, steps: int, tiny: bool, peak_tflops: float, cuda_graphs: bool = False,
                **overrides) -> dict:
    """Time ``steps`` optimizer steps of ``windows`` windows cut into micro-batches of ``micro_batch``."""
    step, model, opt, tcfg = make_step(preset, micro_batch, windows, device, data_dir, compile=compile,
                                       loss_chunk=loss_chunk, tiny=tiny, cuda_graphs=cuda_graphs, **overrides)
    muon = getattr(opt, "optimizers", {}).get("muon")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    common.sync(device)
    warmup_s = time.perf_counter() - t0
    times = [common.time_call(step, device) for _ in range(steps)]
    st = common.summarize_times(times)
    tokens = tcfg.tokens_per_step
    rate = tokens / st["median_s"]
    fpt = common.flops_per_token(model, tcfg.block_size)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"micro_batch": micro_batch, "grad_accum_steps": tcfg.grad_accum_steps, "compiled": compile,
            "cuda_graphs": cuda_graphs, "loss_chunk": loss_chunk, "dtype": str(S._resolve_dtype(tcfg, device)).replace("torch.", ""),
            "optimizer": tcfg.optimizer, "muon_stacked": bool(muon and muon.stack), "tokens_per_step": tokens,
            "tokens_per_s": rate, "step_ms": st["median_s"] * 1e3, "step_ms_q1": st["q1_s"] * 1e3,
            "step_ms_q3": st["q3_s"] * 1e3, "timed_steps": st["n"], "warmup_s": warmup_s,
            "mfu": rate * fpt / (peak_tflops * 1e12), "peak_allocated_gib": peak_gib}


def _mode(row: dict) -> str:
    """How a row ran: eager, compiled, or compiled with CUDA graphs (rows before 2026-11-30 have no
    "cuda_graphs")."""
    if not row["compiled"]:
        return "eager"
    return "compiled + CUDA graphs" if row.get("cuda_graphs") else "compiled"


def markdown(res: dict) -> str:
    lines = ["| micro-batch x accumulation | mode | head + loss | Muon | tok/s | step ms (q1-q3) | MFU | "
             "peak GiB allocated |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        head = f"fused, {r['loss_chunk']:,}-row chunks" if r["loss_chunk"] else "plain"
        peak = f"{r['peak_allocated_gib']:.1f}" if r["peak_allocated_gib"] is not None else "n/a"
        muon = ("stacked" if r.get("muon_stacked") else "one matrix at a time") if r["optimizer"] == "muon" else "-"
        lines.append(f"| {r['micro_batch']} x {r['grad_accum_steps']} | {_mode(r)} | "
                     f"{head} | {muon} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} ({r['step_ms_q1']:.1f}-{r['step_ms_q3']:.1f}) | "
                     f"{r['mfu']:.1%} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = common.step_script_parser(__doc__, overrides=False)
    p.add_argument("--micro-batches", type=_ints, default=[16, 32, 64, 128], help="eager rows, e.g. 16,32,64,128")
    p.add_argument("--compiled", type=_pairs, default=[], help="compiled rows as MB:CHUNK, e.g. 64:0,128:4096")
    p.add_argument("--cuda-graphs", type=_pairs, default=[],
                   help="compiled rows replayed from CUDA graphs, as MB:CHUNK (one micro-batch per step), e.g. 128:4096")
    p.add_argument("--unstacked", type=_pairs_or_eager, default=[],
                   help="rows with Muon one matrix at a time: MB (eager) or MB:CHUNK (compiled), e.g. 128,128:4096")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps per row")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per row")
    p.add_argument("--tiny", action="store_true", help="a 1-layer, 32-wide model: checks the script, measures nothing")
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    _, tcfg = S.preset(args.preset)
    windows = tcfg.batch_size * tcfg.grad_accum_steps  # held fixed across rows
    peak = common.device_peak(device, quick=args.tiny)
    data_dir = Path(common.bench_tmpdir("microbatch-data"))
    rows = []
    try:
        S.prepare_data("shakespeare", data_dir)
        plan = [(mb, False, tcfg.loss_chunk, {}) for mb in args.micro_batches] + \
               [(mb, True, chunk, {}) for mb, chunk in args.compiled] + \
               [(mb, True, chunk, {"cuda_graphs": True}) for mb, chunk in args.cuda_graphs] + \
               [(mb, chunk is not None, chunk or 0, {"muon_stack": "off"}) for mb, chunk in args.unstacked]
        for mb, comp, chunk, overrides in plan:
            rows.append(measure_row(args.preset, mb, windows, device, data_dir, compile=comp, loss_chunk=chunk,
                                    warmup=args.warmup, steps=args.steps, tiny=args.tiny, peak_tflops=peak["tflops"],
                                    **overrides))
            r = rows[-1]
            common.log(f"[microbatch] {mb} x {r['grad_accum_steps']}, {_mode(r)}, "
                       f"loss_chunk {chunk}, Muon {'stacked' if r['muon_stacked'] else 'unstacked'}: "
                       f"{r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%}, "
                       f"warm-up {r['warmup_s']:.1f} s, peak {r['peak_allocated_gib'] or 0:.1f} GiB")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    res = {"machine": common.machine_info(device), "preset": args.preset, "tiny": args.tiny,
           "windows_per_step": windows, "block_size": tcfg.block_size, "peak": peak,
           "command": "python bench/bench_microbatch.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "rows": rows}
    return common.write_result(args.out, res, markdown(res))


if __name__ == "__main__":
    sys.exit(main())
