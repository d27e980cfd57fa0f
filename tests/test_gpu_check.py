"""bench/gpu_check.sh and the time-to-loss runs it starts, checked without a GPU."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slm_utils

REPO = Path(__file__).resolve().parents[1]


def run_check(out: Path, timeout: int, **env) -> subprocess.CompletedProcess:
    """bench/gpu_check.sh OUT with only PATH, PYTHON and ``env`` set."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def load_time_to_loss():
    sys.path.insert(0, str(REPO / "bench"))  # it imports bench/common.py
    spec = importlib.util.spec_from_file_location("time_to_loss", REPO / "bench" / "time_to_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("steps, bad", [("train,decoding", "unknown step 'decoding'"), ("tests train", "'teststrain'"),
                                        (",", "unknown step ''"), (" ", "names no step")])
def test_a_bad_step_list_stops_the_check_before_it_starts(tmp_path, steps, bad):
    run = run_check(tmp_path / "out", 60, GPU_CHECK_STEPS=steps)
    assert run.returncode == 2 and bad in run.stderr
    assert "tests,train,fused,decode,sweep,profile,fusion,ttl,seed,notebook" in run.stderr  # the message lists them
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def test_the_selected_steps_and_only_those_run(tmp_path):
    """A dry run (CPU, tiny sizes) of two steps, named with a space as people type them."""
    out = tmp_path / "out"
    run = run_check(out, 300, HOME=str(tmp_path), SLM_GPU_CHECK_DRY_RUN="1", GPU_CHECK_STEPS="fused, decode")
    assert run.returncode == 0, run.stderr[-2000:]
    made = {p.name for p in out.iterdir()}
    assert {"fused_loss.json", "decode.json", "gpu_check.json"} <= made
    assert not made & {"train.json", "test_cuda.log", "microbatch.json", "profile.json", "fusion.json",
                       "time_to_loss.json", "notebook.log"}


@pytest.mark.parametrize("recipe", ["new", "old", "seed"])
def test_every_recipe_writes_checkpoints_as_the_t4_preset_does(recipe, tmp_path):
    ttl = load_time_to_loss()
    args = ttl.parse_args(["--out", "x.json", "--recipe", recipe, "--dtype", "float16", "--muon-ns-dtype",
                           "float16", "--max-steps", "150"])
    _, cfg = ttl.recipe_configs(args, "cpu", tmp_path)
    _, t4 = ttl.S.preset("t4")
    assert (cfg.last_every_s, cfg.background_checkpoints, cfg.best_weights_only) == \
        (t4.last_every_s, t4.background_checkpoints, t4.best_weights_only)
    assert (cfg.dtype, cfg.muon_ns_dtype, cfg.max_steps) == ("float16", "float16", 150)
    assert cfg.optimizer == {"new": "muon", "old": "adamw", "seed": "adamw"}[recipe]
    assert cfg.tokens_per_step == {"new": 16_384, "old": 16_384, "seed": 131_072}[recipe]


def test_the_micro_batch_sweep_refuses_a_size_that_does_not_divide_the_step(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import bench_microbatch

    assert bench_microbatch._pairs("64:0, 128:4096,32") == [(64, 0), (128, 4096), (32, 0)]
    assert bench_microbatch._pairs_or_eager("128, 128:4096,64:0") == [(128, None), (128, 4096), (64, 0)]
    with pytest.raises(SystemExit, match="48 does not divide the 128 windows"):
        bench_microbatch.measure_row("t4", 48, 128, None, tmp_path, compile=False, loss_chunk=0, warmup=0, steps=1,
                                     tiny=True, peak_tflops=1.0)
    with pytest.raises(slm_utils.ConfigError, match="one micro-batch per optimizer step, not grad_accum_steps=2"):
        bench_microbatch.measure_row("t4", 64, 128, torch.device("cpu"), tmp_path, compile=True, cuda_graphs=True,
                                     loss_chunk=0, warmup=0, steps=1, tiny=True, peak_tflops=1.0)


def test_the_step_profile_reads_its_overrides_and_refuses_an_unknown_mode(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "bench"))
    import common
    import profile_step

    assert common.parse_override("arch=gpt2") == ("arch", "gpt2")  # profile_step's --set
    assert common.parse_override("muon_lr=0.01") == ("muon_lr", 0.01)
    with pytest.raises(SystemExit):
        profile_step.main(["--out", str(tmp_path / "p.json"), "--device", "cpu", "--modes", "eager,fast"])
    assert "--modes 'eager,fast'" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_inductor_groups_counts_generated_kernels_and_prices_the_same_micro_batch():
    """bench/inductor_groups.py: extern calls and no-op nodes are not generated kernels; the projection's
    side is its fused groups of one micro-batch, the ones the compiled step is priced with."""
    sys.path.insert(0, str(REPO / "bench"))
    import inductor_groups
    import project_gpu

    nodes = [{"kind": "SchedulerNode", "name": "a", "bytes": 10}, {"kind": "FusedSchedulerNode", "name": "b", "bytes": 5},
             {"kind": "ExternKernelSchedulerNode", "name": "mm", "bytes": 100},
             {"kind": "NopKernelSchedulerNode", "name": "view", "bytes": 0}]
    assert inductor_groups.summarize_nodes(nodes) == {"kernels": 2, "kernel_bytes": 15, "extern": 1, "extern_bytes": 100}
    mcfg = slm_utils.GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    tcfg = slm_utils.TrainConfig(batch_size=4, block_size=32, max_steps=20, warmup_steps=2)
    trace = project_gpu.trace_train_step(mcfg, tcfg)
    chip = project_gpu.CHIPS["H100"]
    for region in ("forward", "backward"):
        got = inductor_groups.summarize_projection(trace, region, chip["sms"])
        part = [op for op in trace.ops if op.region == region and op.micro == 0]
        assert got["kernels"] + got["extern"] == project_gpu._compiled(part, chip, trace)[2]  # what price() counts
        assert got["extern"] >= 2 * 4 and got["kernel_bytes"] > 0  # at least the 4 matmuls of each block


def test_inductor_lowered_for_a_stand_in_gpu_agrees_with_the_projections_fusion_model(tmp_path):
    """bench/inductor_groups.py --as-gpu: the graphs Inductor compiled on the CPU, lowered again for a
    stand-in H100 by Inductor's own GPU path (Triton scheduling). The attention must come out as the
    GPU's flash kernels (as many library calls as the projection's matmuls and attention ops, not the
    CPU's math), and the projection's fusion model must land near Inductor's own kernels and bytes."""
    sys.path.insert(0, str(REPO / "bench"))
    import inductor_groups

    out = tmp_path / "f.json"
    with pytest.raises(SystemExit, match="dropout=0.1: a CPU build runs attention with dropout by its math path"):
        inductor_groups.main(["--device", "cpu", "--as-gpu", "H100", "--out", str(out), "--set", "dropout=0.1"])
    # dtype left to "auto": the stand-in takes the chip's autocast dtype, not the CPU's fp32
    assert inductor_groups.main(["--device", "cpu", "--as-gpu", "H100", "--micro-batch", "8", "--out", str(out),
                                 "--set", "n_layer=2", "n_head=2", "n_embd=128"]) == 0
    res = json.loads(out.read_text())
    assert res["chip"] == "H100" and res["scheduler"] == "triton, H100 stand-in" and res["dtype"] == "bfloat16"
    for g in res["graphs"]:
        ind, proj = g["inductor"], g["projection"]
        assert ind["extern"] == proj["extern"], g["region"]  # cuBLAS and flash attention, one call each
        assert abs(ind["kernels"] - proj["kernels"]) <= 0.15 * ind["kernels"], (g["region"], ind, proj)
        assert abs(ind["kernel_bytes"] - proj["kernel_bytes"]) <= 0.15 * ind["kernel_bytes"], (g["region"], ind, proj)
        assert g["inductor_cpp"]["kernels"] > 0  # the CPU backend's own count is kept beside it
        assert g["cudagraph_blocker"] is None, g["cudagraph_blocker"]  # TrainConfig.cuda_graphs would replay it


def test_the_stand_in_says_why_inductor_would_decline_cuda_graphs():
    """A graph that changes its input in place is one Inductor runs without CUDA graphs; the stand-in
    lowering says so, and says nothing for the same graph without the change."""
    sys.path.insert(0, str(REPO / "bench"))
    import inductor_groups

    def changes_its_input(x, y):
        x.add_(1)
        return (x * y).sum()

    def leaves_it(x, y):
        return (x * y).sum()

    found = []
    for fn in (changes_its_input, leaves_it):
        torch._dynamo.reset()
        capture = inductor_groups.GraphCapture()
        with inductor_groups._record_scheduler_nodes(), capture:
            torch.compile(fn)(torch.ones(64, 64), torch.ones(64, 64))
        found.append(inductor_groups.lower_for_gpu(capture.graphs, "H100")[1])
    assert len(found[0]) == 1 and "mutated inputs" in found[0][0]  # Inductor's own words
    assert found[1] == [None]
