"""Fast checks of bench/project_gpu.py, the roofline projection of GPU speed (no GPU needed).

Everything is traced on the meta device, so these run in seconds on a CPU.
"""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slm_utils

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "project_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("project_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pg = _load()


def small_config(**fields) -> slm_utils.GPTConfig:
    base = dict(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=True)
    return slm_utils.GPTConfig(**{**base, **fields})


def small_train_config(**fields) -> slm_utils.TrainConfig:
    base = dict(batch_size=4, block_size=32, max_steps=20, warmup_steps=2, eval_interval=10, eval_tokens=256,
                eval_batch_size=4)
    return slm_utils.TrainConfig(**{**base, **fields})


def test_import_does_not_pull_in_torch():
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('p', {str(SCRIPT)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forward_flops_match_2n_per_token_plus_attention(arch):
    mcfg = small_config(**slm_utils.arch_fields(arch))
    B, T = 4, mcfg.block_size
    trace = pg.trace_forward(mcfg, B, T)
    info = pg.model_info(mcfg, T)
    # the forward is a third of 6 N + 12 L C T per token
    expected = B * T * (2 * info["matmul_params"] + 4 * mcfg.n_layer * mcfg.n_embd * T)
    assert trace.flops(("forward",)) == pytest.approx(expected, rel=0.03)


def test_traced_ops_move_bytes_and_autocast_reaches_the_matmuls():
    mcfg = small_config()
    amp = pg.trace_forward(mcfg, 4)
    kernels = [op for op in amp.ops if op.kind not in ("view", "alloc")]
    assert kernels and all(op.bytes > 0 for op in kernels)
    assert amp.bytes() > 0
    matmuls = [op for op in amp.ops if op.kind in ("matmul", "attention")]
    assert matmuls and all(op.tensor_core for op in matmuls)  # bf16 under the emulated autocast
    fp32 = pg.trace_forward(mcfg, 4, amp=False)
    assert not any(op.tensor_core for op in fp32.ops if op.kind == "matmul")
    assert all(op.bytes == 0 for op in amp.ops if op.kind == "view")


@pytest.fixture(scope="module")
def train_trace():
    mcfg, tcfg = small_config(), small_train_config(grad_accum_steps=2, optimizer="muon")
    return mcfg, tcfg, pg.trace_train_step(mcfg, tcfg)


def test_train_step_trace_has_every_part(train_trace):
    _, _, trace = train_trace
    regions = {(op.region, op.micro) for op in trace.ops}
    for part in [("forward", 0), ("backward", 0), ("forward", 1), ("backward", 1), ("optimizer", 1), ("tail", 1)]:
        assert part in regions
    names = {op.name for op in trace.ops}
    assert "_fused_adamw_" in names and "_foreach_norm" in names  # GPU's fused AdamW and foreach clipping
    assert trace.peak_live >= trace.saved > 0


def test_checkpoint_size_is_weights_and_optimizer_state(train_trace):
    mcfg, _, trace = train_trace
    model = pg._meta_model(mcfg)
    stored = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    muon = sum(p.numel() for _, p in slm_utils.muon_parameters(model))
    # fp32 weights, AdamW's two moments for the rest, Muon's one momentum (+ AdamW's step counters)
    expected = 4 * stored + 8 * (stored - muon) + 4 * muon
    assert trace.info["checkpoint_bytes"] == pytest.approx(expected, rel=0.01)


def test_time_is_monotone_in_chip_speed_and_compile_helps(train_trace):
    _, tcfg, trace = train_trace
    for mode in ("eager", "compiled"):
        t = {c: pg.step_cost(trace, tcfg, pg.CHIPS[c], mode)["step_s"] for c in ("H100", "A100-40GB", "T4")}
        assert t["H100"] < t["A100-40GB"] < t["T4"]
    for chip in pg.CHIPS.values():
        eager = pg.step_cost(trace, tcfg, chip, "eager")
        compiled = pg.step_cost(trace, tcfg, chip, "compiled")
        assert compiled["step_s"] <= eager["step_s"]
        assert eager["overlapped_s"] <= eager["step_s"]



def test_gpu_time_by_kind_adds_up_to_the_gpu_time(train_trace):
    _, tcfg, trace = train_trace  # two micro-batches: the later one counts once more
    for chip in ("H100", "T4"):  # the T4's fp16 GradScaler adds its ops to the tail
        for mode in ("eager", "compiled"):
            step = pg.step_cost(trace, tcfg, pg.CHIPS[chip], mode)
            by_kind = step["gpu_by_kind"]
            assert set(by_kind) == set(pg.GPU_TIME_KINDS)
            assert sum(by_kind.values()) == pytest.approx(step["gpu_s"], rel=1e-9)
            assert all(by_kind[k] > 0 for k in ("matmul", "attention", "logits", "other", "optimizer", "tail"))


@pytest.mark.parametrize("loss_chunk", [0, 48])
def test_logits_are_the_ops_on_vocabulary_wide_rows(loss_chunk):
    # 500 ids padded to 512: the plain head slices its logits back to 500, the fused one keeps 512
    mcfg = small_config(vocab_size=500, pad_vocab_multiple=64, tie_weights=False)
    tcfg = small_train_config(loss_chunk=loss_chunk)
    trace = pg.trace_train_step(mcfg, tcfg)
    kind = {}
    for op in trace.ops:
        if op.kind not in ("view", "alloc"):
            kind.setdefault(op.name, set()).add(pg._time_kind(op))
    assert kind["_log_softmax"] == {"logits"}  # the loss, both heads
    assert kind["native_layer_norm"] == {"other"} and kind["gelu"] == {"other"}  # activations, 64 and 256 wide
    assert kind["embedding_dense_backward"] == {"other"}  # the input table's gradient: vocabulary x width
    if not loss_chunk:
        assert kind["nll_loss_backward"] == {"logits"} and kind["slice_backward"] == {"logits"}
    step = pg.step_cost(trace, tcfg, pg.CHIPS["H100"], "compiled")  # fused groups take their ops' kind
    assert step["gpu_by_kind"]["logits"] > 0 and step["gpu_by_kind"]["other"] > 0


def test_mfu_ceiling_orders_the_step_cuda_graphs_and_the_gpus_own_time(tmp_path):
    out = tmp_path / "projection.json"
    pg.main(["--presets", "smoke", "--chips", "H100", "--sweep", "--fused-loss", "--muon-stack", "--ceiling", "8",
             "32", "--no-calibration", "--out", str(out)])
    rows = json.loads(out.read_text())["mfu_ceiling"]["rows"]
    assert [r["batch_size"] for r in rows] == [8, 32]
    for r in rows:
        e = r["chips"]["H100"]
        # CUDA graphs remove the compiled graphs' launches, not the optimizer's or the host's work
        assert e["mfu"] < e["cuda_graphs_mfu"] < e["gpu_only_mfu"] < 1
    small, large = (r["chips"]["H100"] for r in rows)
    assert large["mfu"] > small["mfu"]  # launch overhead weighs less on a bigger micro-batch
    assert large["gpu_share"]["optimizer"] < small["gpu_share"]["optimizer"]  # the same optimizer, more tokens


def test_cuda_graphs_pricing_keeps_the_gpu_time_and_refuses_accumulation(train_trace):
    mcfg, tcfg, accumulated = train_trace
    one = dataclasses.replace(tcfg, grad_accum_steps=1)
    trace = pg.trace_train_step(mcfg, one)
    chip = pg.CHIPS["H100"]
    compiled, graphs = (pg.step_cost(trace, one, chip, m) for m in ("compiled", "cuda_graphs"))
    assert graphs["gpu_s"] == pytest.approx(compiled["gpu_s"]) and graphs["kernels"] == compiled["kernels"]
    assert graphs["cpu_s"] < compiled["cpu_s"]
    with pytest.raises(ValueError, match="one micro-batch per step"):
        pg.step_cost(accumulated, tcfg, chip, "cuda_graphs")
    with pytest.raises(ValueError, match="mode='graphs'"):
        pg.price(trace, chip, "graphs")


def test_decode_step_reads_the_weights_once():
    mcfg = small_config()
    trace = pg.trace_decode_step(mcfg)
    info = pg.model_info(mcfg, mcfg.block_size)
    assert sum(op.kind == "attention" for op in trace.ops) == mcfg.n_layer
    expected = 2 * info["matmul_params"] + 4 * mcfg.n_layer * mcfg.n_embd * (trace.info["cache_len"] + 1)
    assert trace.flops() == pytest.approx(expected, rel=0.05)
    weights = 4 * info["matmul_params"]  # fp32: generate runs without autocast
    assert trace.bytes() >= weights


def test_device_names_map_to_chips():
    assert pg.chip_for_device_name("Tesla T4") == "T4"
    assert pg.chip_for_device_name("NVIDIA L4") == "L4"
    assert pg.chip_for_device_name("NVIDIA A100-SXM4-40GB") == "A100-40GB"
    assert pg.chip_for_device_name("NVIDIA A100-SXM4-80GB") == "A100-80GB"
    assert pg.chip_for_device_name("NVIDIA H100 80GB HBM3") == "H100"
    assert pg.chip_for_device_name("NVIDIA H200") == "H200"
    assert pg.chip_for_device_name("NVIDIA H100 PCIe") is None  # another chip: 756 TFLOPS, 2 TB/s
    assert pg.chip_for_device_name("NVIDIA GeForce RTX 4090") is None
    assert pg.chip_for_device_name("") is None


def test_expected_time_reads_what_main_wrote(tmp_path):
    out = tmp_path / "projection.json"
    pg.main(["--presets", "smoke", "--chips", "T4", "H100", "--sweep", "--ceiling", "--no-calibration", "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["presets"]["smoke"]) == {"T4", "H100"}
    got = pg.expected_time("smoke", "Tesla T4", path=out)
    assert got["chip"] == "T4"
    assert got["eager"] == data["presets"]["smoke"]["T4"]["eager"]
    assert got["compiled"]["total_s"] <= got["eager"]["total_s"]
    assert "min" in got["summary"]
    assert pg.expected_time("smoke", "Some Unknown GPU", path=out) is None
    assert pg.expected_time("seed", "Tesla T4", path=out) is None  # preset not projected
    assert pg.expected_time("smoke", "Tesla T4", path=tmp_path / "missing.json") is None
    shorter = pg.expected_time("smoke", "Tesla T4", path=out, max_steps=6)
    assert shorter["eager"]["train_s"] == pytest.approx(got["eager"]["train_s"] / 2)


def test_expected_time_prices_a_regrouped_split_from_the_sweep(tmp_path):
    """On a large GPU the notebook runs the "t4" preset as 128 x 1 (device_batch): its estimate
    takes that split's step from the sweep; a split the sweep lacks keeps the preset's, and says so."""
    out = tmp_path / "projection.json"
    pg.main(["--presets", "t4", "--chips", "H100", "--sweep", "128", "--fused-loss", "--muon-stack", "--ceiling",
             "--out", str(out)])
    data = json.loads(out.read_text())
    row = data["sweep"]["rows"][0]
    assert (row["batch_size"], row["grad_accum_steps"]) == (128, 1)
    gpu = "NVIDIA H100 80GB HBM3"
    preset = pg.expected_time("t4", gpu, path=out)
    assert preset == pg.expected_time("t4", gpu, path=out, split=(64, 2))  # the preset's own split
    regrouped = pg.expected_time("t4", gpu, path=out, split=(128, 1))
    assert regrouped["split"] == (128, 1) and regrouped["split_note"] is None and "128 x 1" in regrouped["summary"]
    for mode in ("eager", "compiled"):
        e, p = regrouped[mode], preset[mode]
        assert e["tok_s"] == row["tok_s"]["H100"][mode]
        assert e["calibrated"]["tok_s"] == row["tok_s"]["H100"][f"{mode}_calibrated"]
        assert e["calibrated"]["tok_s"] < e["tok_s"] and e["peak_gib"] == row["peak_gib"]
        assert "gpu_ms" not in e  # the preset split's parts of a step are not left beside another split's
        assert e["train_s"] == pytest.approx(p["train_s"] * p["tok_s"] / e["tok_s"])
        assert e["eval_s"] == pytest.approx(p["eval_s"]) and e["ckpt_s"] == pytest.approx(p["ckpt_s"])
        assert e["total_s"] == pytest.approx(e["train_s"] + e["eval_s"] + e["ckpt_s"])
    short = pg.expected_time("t4", gpu, path=out, split=(128, 1), max_steps=300)
    assert short["compiled"]["train_s"] == pytest.approx(regrouped["compiled"]["step_ms"] / 1e3 * 300)
    assert short["compiled"]["total_s"] < 30 and "<1 min compiled" in short["summary"]  # not "~0 min"
    missing = pg.expected_time("t4", gpu, path=out, split=(32, 4))
    assert missing["split"] == (64, 2) and "32 x 4 is not in the projection's sweep" in missing["split_note"]
    assert missing["eager"] == preset["eager"]


def test_shortened_schedule_matches_scale_schedule():
    _, cfg = slm_utils.preset("t4")
    run = {"max_steps": cfg.max_steps, "eval_interval": cfg.eval_interval, "eval_tokens": cfg.eval_tokens,
           "block_size": cfg.block_size, "eval_batch_size": cfg.eval_batch_size}
    for steps in (300, 1000, 5000):
        ours = pg._scaled_run(run, steps)
        theirs = slm_utils.scale_schedule(cfg, steps)
        assert (ours["eval_interval"], ours["eval_tokens"]) == (theirs.eval_interval, theirs.eval_tokens)


def test_memory_timeline_matches_what_a_cpu_step_allocates():
    """The tracer's peak of live tensors equals the CPU allocator's, for the same step in fp32."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    mcfg = small_config(vocab_size=2048, block_size=64, n_embd=64)
    tcfg = small_train_config(batch_size=8, block_size=64, muon_ns_dtype="float32")
    torch.manual_seed(0)
    model = slm_utils.GPT(mcfg)
    optimizer = slm_utils.configure_optimizer(model, tcfg, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randint(0, mcfg.vocab_size, (tcfg.batch_size, tcfg.block_size))
    slm_utils.train_step(model, optimizer, scaler, [(x, x)])  # creates the optimizer state, as the tracer's warm-up
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        slm_utils.train_step(model, optimizer, scaler, [(x, x)])
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    traced = pg.trace_train_step(mcfg, tcfg, amp=False)
    assert traced.peak_live == pytest.approx(peak, rel=0.02)


def test_fused_head_and_loss_keeps_the_flops_and_cuts_the_peak():
    """TrainConfig.loss_chunk traced: the same matmul FLOPs (to 1%), all in bf16, a lower peak, and
    indexed writes priced by what they write, not by the whole tensor."""
    mcfg = small_config(vocab_size=50257, pad_vocab_multiple=64)
    plain, fused = (pg.trace_train_step(mcfg, small_train_config(batch_size=16, loss_chunk=chunk)) for chunk in (0, 64))
    assert fused.flops() == pytest.approx(plain.flops(), rel=0.01)
    assert pg.peak_memory(fused)["peak_gib"] < pg.peak_memory(plain)["peak_gib"]
    head = [op for op in fused.ops if op.kind == "matmul" and op.region == "forward" and op.flops > 0]
    assert head and all(op.tensor_core for op in head)
    puts = [op for op in fused.ops if op.name == "index_put_"]
    assert puts and all(op.bytes < 64 * 1024 for op in puts)  # 64 rows' targets, not 64 x 50,304 logits


def test_compiled_pricing_traces_the_fused_loss_as_torch_compile_receives_it():
    """Under torch.compile the fused head + loss works on each chunk out of place (its eager form, in
    place). The compiled price comes from that form, and its fused loop per chunk moves the logits
    read twice (the softmax's two passes) and the gradient written once: about 3 bf16 chunks, not 4
    (an fp32 copy read again) and not more. Without the fused loss all modes share one trace."""
    mcfg = small_config(vocab_size=50257, pad_vocab_multiple=64)
    tcfg = small_train_config(batch_size=32, loss_chunk=512)  # 1,024 rows; the (Vp,) column ids are small beside a chunk
    eager_forward, is_compiling = slm_utils._FusedLinearCrossEntropy.forward, torch.compiler.is_compiling
    traces = pg.traces_by_mode(pg.trace_train_step, mcfg, tcfg)
    assert (slm_utils._FusedLinearCrossEntropy.forward, torch.compiler.is_compiling) == (eager_forward, is_compiling)
    assert traces["compiled"] is traces["cuda_graphs"] is not traces["eager"]
    names = {mode: {op.name for op in tr.ops if op.region == "forward"} for mode, tr in traces.items()}
    assert {"exp_", "index_put_"} <= names["eager"] and not {"masked_fill", "where"} & names["eager"]
    assert {"masked_fill", "where"} <= names["compiled"] and not {"exp_", "index_put_"} & names["compiled"]
    forward = [op for op in traces["compiled"].ops if op.region == "forward" and op.micro == 0]
    chunks = [g["bytes"] / (512 * 50304 * 2) for g in pg._fused_groups(forward, traces["compiled"], 132)
              if "op" not in g and g["logits"] and g["bytes"] > 512 * 50304]
    assert len(chunks) == 2 and all(c == pytest.approx(3, rel=0.02) for c in chunks), chunks
    plain = pg.traces_by_mode(pg.trace_eval_batch, mcfg, small_train_config())
    assert plain["eager"] is plain["compiled"]


def _optimizer_kernels(trace) -> int:
    return sum(op.launches for op in trace.ops if op.region == "optimizer" and op.kind not in ("view", "alloc"))


def test_stacked_muon_does_the_same_work_in_fewer_kernels():
    """muon_stack 'on' (a GPU's default): the same optimizer FLOPs in far fewer launches."""
    mcfg = small_config()
    off, on, auto = (pg.trace_train_step(mcfg, small_train_config(optimizer="muon", muon_stack=stack))
                     for stack in ("off", "on", "auto"))
    assert on.flops(("optimizer",)) == pytest.approx(off.flops(("optimizer",)), rel=1e-9)
    assert on.flops(("optimizer",)) > 0
    assert _optimizer_kernels(on) < 0.6 * _optimizer_kernels(off)  # 8 matrices in 4 shapes (175 -> 95)
    assert _optimizer_kernels(auto) == _optimizer_kernels(on)  # the trace prices a CUDA device
    chip = pg.CHIPS["H100"]
    tcfg = small_train_config(optimizer="muon")
    assert pg.step_cost(on, tcfg, chip, "eager")["cpu_s"] < pg.step_cost(off, tcfg, chip, "eager")["cpu_s"]


H200_RUN = ROOT / "bench" / "gpu_runs" / "2026-11-29-h200"


def test_a_recorded_gpu_run_is_priced_figure_by_figure_on_its_own_chip():
    run = pg.gpu_run_checks(H200_RUN)
    assert run["chip"] == "H200"
    sweep = json.loads((H200_RUN / "microbatch.json").read_text())["rows"]
    train = json.loads((H200_RUN / "train.json").read_text())
    assert len(run["checks"]) == 5 + len(sweep) + 1  # the lever table, the sweep, the decoding
    by = {c["what"]: c for c in run["checks"]}
    ours = next(r for r in train["rows"] if r["name"].startswith("slm_utils"))
    assert by["GPT-2 shape, 64 x 1, eager"]["measured"] == [ours["tokens_per_s"]]
    assert by["'t4' preset, 128 x 1, eager"]["units"] == 128 * 128  # tokens per optimizer step
    for c in run["checks"]:
        assert c["gpu_s"] > 0 and c["cpu_s"] > 0, c["what"]
    rows = pg.validation_rows(run["checks"], (1.0, 1.0))
    assert all(r["calibrated"] == pytest.approx(r["projected"]) for r in rows)  # factors of 1 change nothing


def test_a_recorded_sweep_row_is_priced_with_the_muon_it_ran(tmp_path):
    """Rows of runs before Muon could stack carry no 'muon_stacked' and ran one matrix at a time."""
    for name in ("train.json", "decode.json"):
        (tmp_path / name).write_text((H200_RUN / name).read_text())
    sweep = json.loads((H200_RUN / "microbatch.json").read_text())
    row = next(r for r in sweep["rows"] if r["micro_batch"] == 128 and not r["compiled"])
    sweep["rows"] = [row, {**row, "muon_stacked": True}]
    (tmp_path / "microbatch.json").write_text(json.dumps(sweep))
    checks = {c["what"]: c for c in pg.gpu_run_checks(tmp_path)["checks"]}
    old, new = checks["'t4' preset, 128 x 1, eager"], checks["'t4' preset, 128 x 1, eager, Muon stacked"]
    assert new["cpu_s"] < old["cpu_s"]


def test_a_run_on_a_gpu_the_projection_does_not_know_is_refused(tmp_path):
    for name in ("microbatch.json", "decode.json"):
        (tmp_path / name).write_text((H200_RUN / name).read_text())
    train = json.loads((H200_RUN / "train.json").read_text())
    train["machine"]["device"]["name"] = "Some Future GPU"
    (tmp_path / "train.json").write_text(json.dumps(train))
    with pytest.raises(SystemExit, match="'Some Future GPU', is not among the chips"):
        pg.gpu_run_checks(tmp_path)


@pytest.mark.parametrize("preset", ["t4", "cpu", "seed"])
def test_the_benchmarks_mfu_counts_the_flops_the_projection_counts(preset):
    """bench/common.flops_per_token (the benchmarks' MFU) and project_gpu.model_info agree: neither
    counts a lookup table (positions, an untied input token table) as matmul work."""
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    mcfg, _ = slm_utils.preset(preset)
    expected = pg.model_info(mcfg, mcfg.block_size)["model_flops_per_token"]
    assert common.flops_per_token(slm_utils.GPT(mcfg), mcfg.block_size) == expected


def test_a_compiled_figure_can_be_priced_with_inductors_own_kernels(tmp_path):
    """With a record of bench/inductor_groups.py, the compiled forward and backward are priced from
    Inductor's generated kernels (their count and bytes) instead of the fused groups; the matmuls and
    attention stay the traced ops. Only an exact record is used, and only for one micro-batch a step."""
    mcfg, tcfg = small_config(), small_train_config()
    trace = pg.trace_train_step(mcfg, tcfg)
    chip = pg.CHIPS["H100"]
    bandwidth = chip["bandwidth_gbs"] * 1e9 * chip["bandwidth_efficiency"]
    plain = pg.step_cost(trace, tcfg, chip, "compiled")
    nodes = {region: [{"kind": "SchedulerNode", "name": f"k{i}", "bytes": 10**6} for i in range(100)]
             + [{"kind": "ExternKernelSchedulerNode", "name": "mm", "bytes": 10**9},
                {"kind": "MultiOutput", "name": "out", "bytes": 0}] for region in ("forward", "backward")}
    priced = pg.step_cost(trace, tcfg, chip, "compiled", nodes)
    groups = [it for r in ("forward", "backward") for it in pg._fused_groups(
        [op for op in trace.ops if op.region == r and op.micro == 0], trace, chip["sms"]) if "op" not in it]
    # only the generated kernels replace the groups; library calls are neither counted twice nor dropped
    assert priced["kernels"] - plain["kernels"] == 200 - sum(g["kernels"] for g in groups)
    assert priced["gpu_s"] - plain["gpu_s"] == pytest.approx((2 * 100 * 10**6 - sum(g["bytes"] for g in groups))
                                                             / bandwidth)
    with pytest.raises(ValueError, match="one micro-batch, not 2"):
        accum = small_train_config(grad_accum_steps=2)
        pg.step_cost(pg.trace_train_step(mcfg, accum), accum, chip, "compiled", nodes)

    def record(cfg=mcfg, **fields):
        return {"model_config": dataclasses.asdict(cfg), "micro_batch": tcfg.batch_size, "block_size": tcfg.block_size,
                "loss_chunk": tcfg.loss_chunk, "chip": "H100", "dtype": "bfloat16",
                "graphs": [{"region": r, "nodes": nodes[r]} for r in ("forward", "backward")], **fields}

    find = lambda records, cfg=mcfg, t=tcfg, dtype="bfloat16", chip="H100": pg.inductor_nodes_for(  # noqa: E731
        records, cfg, t, dtype, chip)
    assert find([record()]) == (nodes, "")
    other = dataclasses.replace(mcfg, dropout=0.1)
    assert find([record()], other)[1] == "Inductor's kernels of the model at dropout 0.0, not 0.1"
    assert find([record(other), record()])[1] == ""  # the exact record wins over one listed before it
    for miss in (dict(cfg=dataclasses.replace(mcfg, n_layer=3)), dict(t=small_train_config(batch_size=8)),
                 dict(t=small_train_config(loss_chunk=64)), dict(dtype="float16"), dict(chip="T4"),
                 dict(t=small_train_config(grad_accum_steps=2))):
        assert find([record()], **miss) == (None, "")
    with pytest.raises(SystemExit, match="2 records of bench/inductor_groups.py match"):
        find([record(), record()])
    with pytest.raises(SystemExit, match="give --validate RUN_DIR too"):
        pg.main(["--presets", "cpu", "--chips", "T4", "--no-calibration", "--sweep", "--fused-loss", "--muon-stack",
                 "--inductor", str(tmp_path / "x.json"), "--out", str(tmp_path / "p.json")])
