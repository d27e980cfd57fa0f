#!/usr/bin/env python
"""Inductor's own kernels and bytes for a compiled step, beside the projection's fusion model.

The projection (``bench/project_gpu.py``) models what ``torch.compile`` fuses between two matmuls
(``ASSUMPTIONS['compiled_fusion']``): which ops share a kernel, and the bytes each kernel moves. This
script
compiles a preset's model as ``train()`` does, runs one micro-batch's forward and backward through
``slm_utils.train_step`` (``bench_microbatch.make_step``), and reads what Inductor decided: for each
compiled graph (the forward, then the backward), its scheduler's nodes after fusion. Each node that
is not an extern call (a matmul, an attention kernel) becomes a generated kernel on a GPU, and
Inductor counts the bytes each node reads and writes. Beside them, the same micro-batch traced by
the projection: its fused groups, their kernels and bytes, and its matmul / attention ops.

On a GPU the nodes are Triton kernels. On a CPU the scheduler fuses by the C++ backend's rules and
the C++ code then merges runs of nodes into one function, so a CPU run alone checks the script, not
the model. ``--as-gpu CHIP`` closes that gap without a GPU: after the CPU step, each graph Inductor
received is lowered again for a stand-in CUDA device with that chip's compute capability and SM
count, through Inductor's own GPU path (decompositions, post-grad passes, lowering, the Triton
scheduler's fusion), and stopped before any kernel is generated. Its nodes are what a GPU build of
the same PyTorch would launch, up to the stand-ins listed at ``_pretend_cuda`` and ``_to_cuda``
(BENCHMARKS.md section 8 compares them with the projection; a ``--device cuda`` run checks them).
Each stand-in graph also records whether Inductor would decline CUDA graphs for it
(``cudagraph_blocker``, ``TrainConfig.cuda_graphs``).

    python bench/inductor_groups.py --device cuda --out fusion.json                 # "t4", 64 windows
    python bench/inductor_groups.py --device cuda --set arch=gpt2 optimizer=adamw --out f.json
    python bench/inductor_groups.py --device cpu --as-gpu H100 --set dtype=bfloat16 --out f.json
    python bench/inductor_groups.py --device cpu --tiny --out /tmp/f.json            # plumbing only
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
import sys
import types
import warnings
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository root on sys.path)

import torch  # noqa: E402

import project_gpu  # noqa: E402
from bench_microbatch import make_step  # noqa: E402


def _node_record(node) -> dict:
    """One scheduler node: its kind, name, the bytes Inductor counts for it, and the ATen ops folded into it."""
    origins = {o.target for sub in node.get_nodes() if getattr(sub, "node", None) is not None
               for o in sub.node.get_origins() if o.op == "call_function"}
    ops = sorted({getattr(t, "__name__", str(t)).split(".")[0] for t in origins})
    kind = "MultiOutput" if type(getattr(node, "node", None)).__name__ == "MultiOutput" else type(node).__name__
    return {"kind": kind, "name": node.get_name(), "bytes": int(node.get_read_write_buffers_sizes()),
            "ops": ops}


@contextlib.contextmanager
def _record_scheduler_nodes():
    """While active, each graph Inductor compiles appends its fused nodes to the yielded list."""
    from torch._inductor import config
    from torch._inductor.graph import GraphLowering

    graphs: list[list[dict]] = []
    codegen = GraphLowering.codegen

    def recording(self, *args, **kwargs):
        out = codegen(self, *args, **kwargs)
        graphs.append([_node_record(n) for n in self.scheduler.nodes])
        return out

    # a cached graph skips the scheduler, and there would be nothing to read
    caches = [mock.patch.object(config, "fx_graph_cache", False)]
    if hasattr(torch._functorch.config, "enable_autograd_cache"):  # an older PyTorch has no such cache
        caches.append(mock.patch.object(torch._functorch.config, "enable_autograd_cache", False))
    with contextlib.ExitStack() as stack:
        for patch in caches:
            stack.enter_context(patch)
        stack.enter_context(mock.patch.object(GraphLowering, "codegen", recording))
        yield graphs


class GraphCapture:
    """Keeps a copy of every graph Inductor compiles while active (after AOTAutograd's partition: the
    forward, then the backward), with its example inputs' shapes and its compile flags, to lower again."""

    def __init__(self):
        self.graphs: list[tuple] = []

    def __enter__(self):
        from torch._inductor import compile_fx

        self._inner = inner = compile_fx._compile_fx_inner

        def capturing(gm, example_inputs, **kwargs):
            specs = [(tuple(t.shape), t.stride(), t.dtype) if isinstance(t, torch.Tensor) else t
                     for t in example_inputs]
            keep = {k: v for k, v in kwargs.items() if k in ("is_backward", "is_inference", "static_input_idxs")}
            self.graphs.append((copy.deepcopy(gm), specs, keep))
            return inner(gm, example_inputs, **kwargs)

        compile_fx._compile_fx_inner = capturing
        return self

    def __exit__(self, *exc):
        from torch._inductor import compile_fx

        compile_fx._compile_fx_inner = self._inner


# compute capability of each chip of project_gpu.CHIPS: Inductor's lowering asks for it (bf16 support,
# which kernels to use), as it asks for the SM count (how many pieces a large reduction is split into)
_CAPABILITY = {"T4": (7, 5), "L4": (8, 9), "A100-40GB": (8, 0), "A100-80GB": (8, 0), "H100": (9, 0), "H200": (9, 0)}


@contextlib.contextmanager
def _pretend_cuda(chip: str):
    """Make a CPU build of PyTorch answer like one with ``chip`` attached, for as long as Inductor lowers
    and schedules; nothing may run on it. The three stand-ins that touch what is counted:
    - the device's properties (name, capability, SMs, memory) come from this table, not a driver;
    - fake CUDA tensors whose fake kernel needs a CUDA device guard keep the value the CPU trace found
      (same shape, strides and dtype) instead of recomputing it;
    - the reinplacing pass builds a scatter's fake value without the in-place copy (same reason).
    Everything else is Inductor's own code for a CUDA device."""
    import torch._dynamo.device_interface as device_interface
    import torch._inductor.compile_fx as compile_fx
    import torch._inductor.fx_passes.reinplace as reinplace
    import torch._inductor.scheduler as scheduler
    import torch.utils._triton as triton_utils
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    spec = project_gpu.CHIPS[chip]
    props = types.SimpleNamespace(
        name=f"NVIDIA {chip} (stand-in)", major=_CAPABILITY[chip][0], minor=_CAPABILITY[chip][1],
        multi_processor_count=spec["sms"], total_memory=int(spec["usable_gib"] * 2**30), warp_size=32,
        max_threads_per_multi_processor=2048, max_threads_per_block=1024, regs_per_multiprocessor=65536,
        shared_memory_per_block_optin=99 * 1024, L2_cache_size=40 * 2**20, gcnArchName="", is_integrated=False,
        uuid="stand-in", clock_rate=1_500_000, memory_clock_rate=1_500_000, memory_bus_width=4096)
    fixed = {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
             "get_device_properties": lambda *a, **k: props, "get_device_capability": lambda *a, **k: _CAPABILITY[chip],
             "get_device_name": lambda *a, **k: props.name, "is_bf16_supported": lambda *a, **k: props.major >= 8,
             "set_device": lambda *a, **k: None, "synchronize": lambda *a, **k: None, "_lazy_init": lambda: None,
             "is_initialized": lambda: True, "_exchange_device": lambda i: 0, "_maybe_exchange_device": lambda i: 0,
             "get_rng_state": lambda *a, **k: torch.zeros(16, dtype=torch.uint8), "set_rng_state": lambda *a, **k: None}
    interface = device_interface.CudaInterface
    run_node = FakeTensorProp.run_node

    def keep_known_value(self, n):
        try:
            return run_node(self, n)
        except RuntimeError as e:
            if "not linked with support for cuda" not in str(e) or "val" not in n.meta:
                raise
            return n.meta["val"]

    from torch._inductor.runtime.hints import DeviceProperties
    from torch._inductor.utils import is_big_gpu

    def forget_devices():  # Inductor caches what it learnt of a device; another stand-in must not see it
        DeviceProperties.create.cache_clear()
        is_big_gpu.cache_clear()

    with contextlib.ExitStack() as stack:
        stack.callback(forget_devices)
        forget_devices()
        patch = lambda *args: stack.enter_context(mock.patch.object(*args))  # noqa: E731
        for name, fn in fixed.items():
            patch(torch.cuda, name, fn)
        for name in ("is_available", "device_count", "current_device", "get_device_properties", "set_device",
                     "synchronize", "is_bf16_supported"):
            patch(interface, name, staticmethod(fixed[name]))
        patch(interface, "get_compute_capability", staticmethod(lambda *a, **k: props.major * 10 + props.minor))
        for name in ("get_device_properties", "current_device", "set_device"):
            patch(interface.Worker, name, staticmethod(fixed[name]))
        for module in (triton_utils, scheduler, compile_fx):
            patch(module, "has_triton", lambda: True)  # Triton is asked for, never run: nothing is compiled
        patch(reinplace, "_inplace_generalized_scatter", lambda inp, src, view_ops: inp)
        patch(FakeTensorProp, "run_node", keep_known_value)
        # a Python method binding takes a CUDA device guard, which a CPU build lacks; the function does not
        patch(torch.Tensor, "__invert__", lambda self: torch.bitwise_not(self))
        yield


def _to_cuda(gm) -> set[str]:
    """Move the captured graph's devices to CUDA, and swap the CPU attention kernels for the
    flash-attention ones a GPU runs (same inputs; the CUDA backward's extra inputs are placeholders).
    Returns the inputs that must be contiguous: the saved log-sum-exp a GPU's flash forward returns
    contiguous, where the CPU one's layout differs (Inductor would otherwise add a copy)."""
    aten = torch.ops.aten
    cuda = torch.device("cuda", 0)
    contiguous: set[str] = set()
    g = gm.graph
    to_cuda = lambda a: cuda if isinstance(a, torch.device) and a.type == "cpu" else a  # noqa: E731
    for n in list(g.nodes):
        # devices appear as keyword arguments (full, empty) and positional ones (the RNG seeds of dropout)
        n.args = tuple(to_cuda(a) for a in n.args)
        n.kwargs = {k: to_cuda(v) for k, v in n.kwargs.items()}
        if n.target in (aten._scaled_dot_product_flash_attention_for_cpu.default,
                        aten._scaled_dot_product_flash_attention_for_cpu_backward.default) \
                and n.kwargs.get("attn_mask") is not None:
            raise SystemExit("--as-gpu: an attention with an explicit mask has no flash kernel on a GPU; the "
                             "stand-in cannot show what a GPU would run for it.")
        if n.target is aten._scaled_dot_product_flash_attention_for_cpu.default:
            n.target = aten._scaled_dot_product_flash_attention.default  # outputs 0 and 1 are the same
            n.kwargs = {k: v for k, v in n.kwargs.items() if k != "attn_mask"}
        elif n.target is aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
            grad_out, q, k, v, out, lse, dropout_p, causal = n.args[:8]
            length = q.meta["val"].shape[2]
            if lse.op == "placeholder":
                contiguous.add(lse.name)
            with g.inserting_before(n):
                cum_seq = g.call_function(aten.empty.memory_format, ([0],), {"dtype": torch.int64, "device": cuda})
                philox = g.call_function(aten.empty.memory_format, ([2],), {"dtype": torch.uint64, "device": cuda})
            n.target = aten._scaled_dot_product_flash_attention_backward.default
            n.args = (grad_out, q, k, v, out, lse, cum_seq, cum_seq, length, length, dropout_p, causal, philox, philox)
            n.kwargs = {k2: v2 for k2, v2 in n.kwargs.items() if k2 != "attn_mask"}
    g.lint()
    gm.recompile()
    return contiguous


def _fake_cuda_values(gm, inputs, mode) -> None:
    """Give every node a fake CUDA value, as Inductor's passes expect (the captured ones are CPU tensors)."""
    import torch.utils._pytree as pytree

    def on_cuda(v):
        if not isinstance(v, torch.Tensor):
            return v
        with mode:
            return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cuda")

    env, feed = {}, iter(inputs)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(feed)
        elif n.op == "get_attr":  # a constant of the graph
            env[n] = pytree.tree_map(on_cuda, n.meta.get("val"))
        elif n.op == "call_function":
            args, kwargs = pytree.tree_map(lambda x: env[x] if isinstance(x, torch.fx.Node) else x, (n.args, n.kwargs))
            try:
                with mode:
                    env[n] = n.target(*args, **kwargs)
            except RuntimeError:  # a fake kernel that needs a CUDA device guard: the value the CPU trace found
                env[n] = pytree.tree_map(on_cuda, n.meta.get("val"))
        else:
            continue
        n.meta["val"] = env[n]


class _Scheduled(Exception):
    """Raised once the scheduler has fused a graph: there is nothing to generate or compile."""


def _cudagraph_blocker(lowering, gm, static_input_idxs, example_inputs) -> str | None:
    """Why Inductor would run a graph without CUDA graphs (``TrainConfig.cuda_graphs``), by the checks
    it makes on the graph itself, in its order (torch 2.13's ``compile_fx`` and ``output_code``): a
    reason found while lowering; with graph partitioning off, an op CUDA graphs cannot hold or a node
    on the CPU (with it on, the default, those split the graph into parts instead of declining it);
    an input changed in place that is not a parameter (a static input) nor recorded by another graph;
    an input's storage changed; an input that is not a tensor. None: none of them. The allocator's
    settings, which it checks too, are not."""
    from torch._inductor import config
    from torch._inductor.cudagraph_utils import (
        check_for_mutation_ignore_cuda_graph_managed_tensor,
        check_multiple_devices_or_any_cpu_nodes,
        get_input_storage_mutation_info,
        get_input_storage_mutation_reason,
    )
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    if lowering.disable_cudagraphs_reason:
        return lowering.disable_cudagraphs_reason
    if not config.graph_partition:
        node = get_first_incompatible_cudagraph_node(gm)
        if node is not None:
            return f"an op CUDA graphs cannot hold: {node.target}"
    with config.patch({"triton.cudagraphs": True}):  # as mode="reduce-overhead" sets it
        devices = check_multiple_devices_or_any_cpu_nodes(dict(lowering.device_node_mapping))
    if devices:
        return devices
    # Inductor makes this one when the graph runs (cudagraph_support_input_mutation, on by default),
    # sparing inputs that another graph recorded; a batch or a gradient never is one
    mutated = check_for_mutation_ignore_cuda_graph_managed_tensor(
        gm, lowering.mutated_inputs, lowering.mutated_input_idxs, static_input_idxs)
    if mutated:
        return mutated
    storage = get_input_storage_mutation_reason(get_input_storage_mutation_info(gm))
    if storage:
        return storage
    allowed = (torch.Tensor, torch.SymInt, torch.Generator)
    try:  # the kinds of input output_code accepts; an older PyTorch has no opaque objects
        from torch._opaque_base import OpaqueBase
        allowed += (OpaqueBase,)
    except ImportError:
        pass
    if not all(isinstance(t, allowed) for t in example_inputs):
        return "non-Tensor inputs"
    return None


def lower_for_gpu(captured: list[tuple], chip: str) -> tuple[list[list[dict]], list[str | None]]:
    """Lower each graph of a ``GraphCapture`` again for a stand-in ``chip``: its scheduler's nodes after
    fusion, and why Inductor would decline CUDA graphs for it (``_cudagraph_blocker``; None: no reason)."""
    from torch._inductor import compile_fx
    from torch._inductor.graph import GraphLowering
    from torch._inductor.scheduler import Scheduler
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs: list[list[dict]] = []
    lowerings: list = []

    def schedule_only(self):
        self.scheduler = Scheduler(self.operations)
        graphs.append([_node_record(n) for n in self.scheduler.nodes])
        lowerings.append(self)
        raise _Scheduled

    blockers: list[str | None] = []
    with _pretend_cuda(chip), mock.patch.object(GraphLowering, "_update_scheduler", schedule_only), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TensorFloat32")  # a GPU's advice on fp32 matmuls; nothing runs
        for gm, specs, kwargs in captured:
            contiguous = _to_cuda(gm)
            names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
            mode = FakeTensorMode()
            with mode:
                inputs = [s if not isinstance(s, tuple) else
                          torch.empty(s[0], dtype=s[2], device="cuda") if name in contiguous else
                          torch.empty_strided(s[0], s[1], dtype=s[2], device="cuda") for name, s in zip(names, specs)]
            _fake_cuda_values(gm, inputs, mode)
            try:
                with torch._guards.tracing(torch._guards.TracingContext(mode)):
                    compile_fx.compile_fx_inner(gm, inputs, **kwargs)
            except Exception as e:  # Inductor wraps _Scheduled in its own error
                cause = e
                while cause is not None and not isinstance(cause, _Scheduled):
                    cause = cause.__cause__ or cause.__context__
                if cause is None:  # it failed before its scheduler ran: a real error
                    raise
            blockers.append(_cudagraph_blocker(lowerings[-1], gm, kwargs.get("static_input_idxs") or (), inputs))
    return graphs, blockers


def summarize_nodes(nodes: list[dict]) -> dict:
    kernels = [n for n in nodes if n["kind"] not in project_gpu.INDUCTOR_NOT_GENERATED]
    extern = [n for n in nodes if n["kind"] == "ExternKernelSchedulerNode"]
    return {"kernels": len(kernels), "kernel_bytes": sum(n["bytes"] for n in kernels),
            "extern": len(extern), "extern_bytes": sum(n["bytes"] for n in extern)}


def summarize_projection(trace, region: str, sms: int) -> dict:
    """The projection's fused groups of one region of micro-batch 0, as ``price`` sees them on a chip
    with ``sms`` SMs (how many decides which reductions split)."""
    ops = [op for op in trace.ops if op.region == region and op.micro == 0]
    items = project_gpu._fused_groups(ops, trace, sms)
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
    p.add_argument("--as-gpu", choices=sorted(_CAPABILITY), default=None,
                   help="with --device cpu: also lower the graphs for a stand-in CUDA device of this chip and "
                        "count its Triton scheduler's nodes (no GPU needed)")
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    overrides = dict(args.set)
    S = project_gpu._slm()
    if args.as_gpu:
        if device.type != "cpu":
            raise SystemExit(f"--as-gpu {args.as_gpu} stands in for a GPU on a CPU build; on {device} read the "
                             "GPU's own scheduler: drop --as-gpu.")
        mcfg, tcfg = S.preset(args.preset, **overrides)
        if mcfg.dropout > 0:
            raise SystemExit(f"--as-gpu: dropout={mcfg.dropout}: a CPU build runs attention with dropout by its "
                             "math path, not the flash kernel a GPU runs. Fix: --set dropout=0.0 (and say so).")
        if tcfg.dtype == "auto":  # what the chip's autocast would use, not the CPU's fp32
            overrides["dtype"] = project_gpu.CHIPS[args.as_gpu]["amp"]
    capture = GraphCapture() if args.as_gpu else contextlib.nullcontext()  # only a stand-in lowers them again
    data_dir = Path(common.bench_tmpdir("fusion-data"))
    try:
        S.prepare_data("shakespeare", data_dir)
        step, model, _, tcfg = make_step(args.preset, args.micro_batch, args.micro_batch, device, data_dir,
                                         compile=True, loss_chunk=args.loss_chunk, tiny=args.tiny, **overrides)
        with _record_scheduler_nodes() as graphs, capture:
            step()  # compiles the forward, then the backward
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    if len(graphs) != 2:
        raise SystemExit(f"Inductor compiled {len(graphs)} graph(s), not one forward and one backward: a graph "
                         "break, or a PyTorch that compiles differently from the one this script was written "
                         "for (2.11-2.13). The graphs cannot be told apart, so nothing is recorded.")
    backend = "cpp"
    if args.as_gpu:
        cpu_graphs = graphs
        graphs, blockers = lower_for_gpu(capture.graphs, args.as_gpu)
        backend = f"triton, {args.as_gpu} stand-in"
    # the projection's trace of the same micro-batch, with the loss chunk the compiled step used, in the
    # form torch.compile receives
    trace = project_gpu.trace_train_step(model.config, dataclasses.replace(tcfg, loss_chunk=args.loss_chunk),
                                         compiled=True)
    chip = args.as_gpu or (project_gpu.chip_for_device_name(torch.cuda.get_device_name(device))
                           if device.type == "cuda" else None)
    sms = project_gpu.CHIPS[chip or "H100"]["sms"]
    res = {"machine": common.machine_info(device), "preset": args.preset, "overrides": dict(args.set),
           "dtype": str(S._resolve_dtype(tcfg, device)).removeprefix("torch."),  # the autocast the graphs were made under
           "micro_batch": args.micro_batch, "loss_chunk": args.loss_chunk, "tiny": args.tiny,
           "as_gpu": args.as_gpu, "scheduler": backend if device.type == "cpu" else "triton",
           # the chip whose scheduler decided (its SM count sets how reductions split): None on a CPU alone
           "chip": chip,
           "model_config": dataclasses.asdict(model.config), "block_size": tcfg.block_size,
           "command": "python bench/inductor_groups.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "graphs": [{"region": region, "inductor": summarize_nodes(nodes),
                       "projection": summarize_projection(trace, region, sms), "nodes": nodes}
                      for region, nodes in zip(("forward", "backward"), graphs)]}
    if args.as_gpu:
        for g, nodes, blocker in zip(res["graphs"], cpu_graphs, blockers):
            g["inductor_cpp"] = summarize_nodes(nodes)
            g["cudagraph_blocker"] = blocker  # None: Inductor's checks of the graph would allow CUDA graphs
    return common.write_result(args.out, res, markdown(res))


if __name__ == "__main__":
    sys.exit(main())
