#!/usr/bin/env python
"""Inductor's own kernels and bytes for a compiled step, beside the projection's fusion model.

The projection (``bench/project_gpu.py``) models ``torch.compile`` as one fused kernel per run of
ops between two matmuls, reading each outside tensor once (``ASSUMPTIONS['compiled_fusion']``), and
its compiled figures came out 56-71% optimistic on an H200 (BENCHMARKS.md section 8). This script
compiles a preset's model as ``train()`` does, runs one micro-batch's forward and backward through
``slm_utils.train_step`` (``bench_microbatch.make_step``), and reads what Inductor decided: for each
compiled graph (the forward, then the backward), its scheduler's nodes after fusion. Each node that
is not an extern call (a matmul, an attention kernel) becomes a generated kernel on a GPU, and
Inductor counts the bytes each node reads and writes. Beside them, the same micro-batch traced by
the projection: its fused groups, their kernels and bytes, and its matmul / attention ops.

On a GPU the nodes are Triton kernels. On a CPU the scheduler fuses by the C++ backend's rules and
the C++ code then merges runs of nodes into one function, so a CPU run checks the script, not the
model.

    python bench/inductor_groups.py --device cuda --out fusion.json                 # "t4", 64 windows
    python bench/inductor_groups.py --device cuda --set arch=gpt2 optimizer=adamw --out f.json
    python bench/inductor_groups.py --device cpu --tiny --out /tmp/f.json            # plumbing only
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository root on sys.path)

import torch  # noqa: E402

import project_gpu  # noqa: E402
from bench_microbatch import make_step  # noqa: E402

# scheduler nodes that launch no generated kernel: calls into a library (cuBLAS, flash attention),
# and nodes that only alias or reinterpret a buffer
_NOT_GENERATED = ("ExternKernelSchedulerNode", "NopKernelSchedulerNode")


def _record_scheduler_nodes() -> list[list[dict]]:
    """Wrap Inductor's code generation so that each compiled graph appends its fused nodes."""
    from torch._inductor import config
    from torch._inductor.graph import GraphLowering

    config.fx_graph_cache = False  # a cached graph skips the scheduler, and there would be nothing to read
    try:
        torch._functorch.config.enable_autograd_cache = False
    except AttributeError:  # an older PyTorch has no such cache
        pass
    graphs: list[list[dict]] = []
    codegen = GraphLowering.codegen

    def recording(self, *args, **kwargs):
        out = codegen(self, *args, **kwargs)
        graphs.append([{"kind": type(n).__name__, "name": n.get_name(), "bytes": int(n.get_read_write_buffers_sizes())}
                       for n in self.scheduler.nodes])
        return out

    GraphLowering.codegen = recording
    return graphs


def summarize_nodes(nodes: list[dict]) -> dict:
    kernels = [n for n in nodes if n["kind"] not in _NOT_GENERATED]
    extern = [n for n in nodes if n["kind"] == "ExternKernelSchedulerNode"]
    return {"kernels": len(kernels), "kernel_bytes": sum(n["bytes"] for n in kernels),
            "extern": len(extern), "extern_bytes": sum(n["bytes"] for n in extern)}


def summarize_projection(trace, region: str) -> dict:
    """The projection's fused groups of one region of micro-batch 0, as ``price`` sees them."""
    ops = [op for op in trace.ops if op.region == region and op.micro == 0]
    items = project_gpu._fused_groups(ops, trace)
    groups = [i for i in items if "op" not in i]
    extern = [i["op"] for i in items if "op" in i]
    return {"kernels": sum(g["kernels"] for g in groups), "kernel_bytes": sum(g["bytes"] for g in groups),
            "extern": len(extern), "extern_bytes": sum(op.read + op.write for op in extern)}


def markdown(res: dict) -> str:
    lines = ["| graph | generated kernels: Inductor / projection | their MB: Inductor / projection | "
             "extern calls: Inductor / projection | their MB: Inductor / projection |", "|---|---|---|---|---|"]
    for g in res["graphs"]:
        i, p = g["inductor"], g["projection"]
        lines.append(f"| {g['region']} | {i['kernels']} / {p['kernels']} | {i['kernel_bytes'] / 1e6:,.1f} / "
                     f"{p['kernel_bytes'] / 1e6:,.1f} | {i['extern']} / {p['extern']} | "
                     f"{i['extern_bytes'] / 1e6:,.1f} / {p['extern_bytes'] / 1e6:,.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = common.step_script_parser(__doc__)
    p.add_argument("--micro-batch", type=int, default=64, help="windows of the one micro-batch compiled")
    p.add_argument("--loss-chunk", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a 1-layer, 32-wide model: checks the script, measures nothing")
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    graphs = _record_scheduler_nodes()
    data_dir = Path(common.bench_tmpdir("fusion-data"))
    try:
        S = project_gpu._slm()
        S.prepare_data("shakespeare", data_dir)
        step, model, _, tcfg = make_step(args.preset, args.micro_batch, args.micro_batch, device, data_dir,
                                         compile=True, loss_chunk=args.loss_chunk, tiny=args.tiny, **dict(args.set))
        step()  # compiles the forward, then the backward
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    if len(graphs) < 2:
        raise SystemExit(f"Inductor generated {len(graphs)} graph(s), not a forward and a backward: this PyTorch "
                         "compiles differently from the one this script was written for (2.11-2.13).")
    # the projection's trace of the same micro-batch, with the loss chunk the compiled step used
    trace = project_gpu.trace_train_step(model.config, dataclasses.replace(tcfg, loss_chunk=args.loss_chunk))
    res = {"machine": common.machine_info(device), "preset": args.preset, "overrides": dict(args.set),
           "micro_batch": args.micro_batch, "loss_chunk": args.loss_chunk, "tiny": args.tiny,
           "command": "python bench/inductor_groups.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "graphs": [{"region": region, "inductor": summarize_nodes(nodes),
                       "projection": summarize_projection(trace, region), "nodes": nodes}
                      for region, nodes in zip(("forward", "backward"), graphs)]}
    return common.write_result(args.out, res, markdown(res))


if __name__ == "__main__":
    sys.exit(main())
