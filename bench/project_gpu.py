#!/usr/bin/env python
"""Roofline projection of training and decoding speed on GPUs, built on a CPU alone.

No GPU is touched and no figure here is a measurement. The script traces what one training step
of a preset does, op by op, on PyTorch's ``meta`` device (tensors with shapes and dtypes but no
data, so a 30M-parameter step traces in a fraction of a second), then prices every op on each chip
of ``CHIPS``:

    op time = max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth) + launch overhead

and sums over the step. Every constant behind that sum (datasheet figures, achievable fractions,
launch costs, what ``torch.compile`` fuses, checkpoint write speeds) is in ``CHIPS`` or
``ASSUMPTIONS`` below, each with its source or its reasoning, and is copied into the JSON.

What is traced, and how a CPU build is made to show what a CUDA build would run:

1. ``slm_utils.train_step`` itself: forward, backward, gradient clipping and the optimizer step
   of ``configure_optimizer`` (AdamW, or Muon + AdamW), with a second micro-batch when the preset
   accumulates gradients (the second pays the gradient additions the first does not). One warm-up
   step runs first, untimed, so that the optimizer state exists and the traced step is a steady one.
   ``.item()`` cannot run on meta tensors: the tracer answers it (1.0) without computing anything.
2. CUDA autocast, which needs a CUDA build, is emulated by a ``TorchFunctionMode`` that casts the
   inputs of the matmul-type functions to bf16 (weights cast once per micro-batch, as autocast's
   cache does), so activations, saved tensors and bytes carry the dtypes a GPU run has. Softmax and
   log-softmax are told to compute in fp32 instead (autocast's policy for them: one kernel, no
   copy). The model's forward is under autocast, inside an ``autograd.Function`` too.
3. ``F.scaled_dot_product_attention`` is routed to the flash-attention op (the efficient-attention
   op for fp32, as in decoding), ``F.rms_norm`` to one fused op and ``F.dropout`` to
   ``native_dropout``, as on CUDA; on the meta device they would otherwise decompose into the
   many small ops of their CPU fallbacks. (RMSNorm's CUDA kernel has no meta form, so a stand-in
   op with the same inputs, outputs and saved tensors is registered under ``projgpu::``.)
4. Fused AdamW and the foreach (multi-tensor) gradient clipping run on meta tensors once torch is
   told, for the duration of the trace, that the meta device supports them.

What it reports, per preset and chip, eager and compiled: training tokens/s, MFU, the full run's
training, evaluation and checkpoint time, cached batch-1 decoding tokens/s, peak memory; a
micro-batch sweep of the "t4" preset; the "t4" preset with the fused head + loss
(``TrainConfig.loss_chunk``) against the plain one; and a check against the GPU figures measured
on an H100 and recorded in BENCHMARKS.md.

    python bench/project_gpu.py [--presets seed t4 cpu] [--chips T4 L4 A100 H100]
                                [--out bench/projection.json] [--measured-tok-s CHIP=VALUE ...]

The notebook side needs neither torch nor a trace: ``expected_time(preset, gpu_name, split=...)``
reads the JSON this script wrote. Importing this module imports nothing heavier than json and pathlib.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "projection.json"

# =====================================================================================
# The chips: datasheet figures, and how much of them a real kernel gets
# =====================================================================================
#
# tensor_tflops: dense (no 2:4 sparsity) fp16/bf16 tensor-core peak; the datasheets print the
# sparse figure, twice this, for L4, A100, H100 and H200. fp32_tflops: plain FP32 (CUDA cores),
# which an fp32 matmul gets (PyTorch leaves TF32 off for matmuls by default), as in decoding.
# usable_gib: what nvidia-smi reports as total memory (ECC and firmware reserve the rest).
# sms: streaming multiprocessors, for the wave quantization of small matmuls.
# amp: the autocast dtype slm_utils.choose_amp_dtype picks (fp16 + GradScaler below sm 8.0).

_EFF_H100 = ("assumption, not measured in this project: the 989 TFLOPS assume the 1.83 GHz boost "
             "clock; large cuBLAS bf16 GEMMs are commonly reported at 600-750 TFLOPS on an H100 SXM; we "
             "take 70%. (BENCHMARKS.md's H100 run did not measure a GEMM peak: the H100 is in its table.)")
_BW = "assumption: copy/STREAM-like kernels reach 80-90% of the datasheet bandwidth; we take 80% for every chip"

CHIPS: dict[str, dict] = {
    "T4": {
        "gpu": "NVIDIA Tesla T4 (Turing TU104, sm 7.5, 70 W, PCIe)",
        "tensor_tflops": 65.0, "fp32_tflops": 8.1, "bandwidth_gbs": 320.0, "memory_gb": 16, "usable_gib": 15.0,
        "sms": 40, "amp": "float16",
        "matmul_efficiency": 0.37, "bandwidth_efficiency": 0.80,
        "source": "NVIDIA T4 datasheet: 65 TFLOPS mixed-precision (FP16/FP32) tensor, 8.1 TFLOPS FP32, 16 GB "
                  "GDDR6, 320 GB/s, 70 W; 40 SMs (2,560 CUDA cores, 64 per Turing SM); nvidia-smi shows 15,360 MiB",
        "efficiency_source": "matmul: a user measured 24 of the 65 TFLOPS with cuBLAS fp16 4096^3 GEMMs, and NVIDIA's "
                             "forum moderator put it down to the 70 W power cap (clocks fall from the 1,590 MHz "
                             "boost): "
                             "forums.developer.nvidia.com/t/about-gpu-peak-performance/264462; 24/65 = 0.37, the same "
                             "~24 TFLOP/s that BENCHMARKS.md section 2 quotes. bandwidth: " + _BW,
    },
    "L4": {
        "gpu": "NVIDIA L4 (Ada AD104, sm 8.9, 72 W, PCIe)",
        "tensor_tflops": 121.0, "fp32_tflops": 30.3, "bandwidth_gbs": 300.0, "memory_gb": 24, "usable_gib": 22.5,
        "sms": 58, "amp": "bfloat16",
        "matmul_efficiency": 0.50, "bandwidth_efficiency": 0.80,
        "source": "NVIDIA L4 datasheet: 242 TFLOPS FP16/BF16 tensor with sparsity (121 dense), 30.3 TFLOPS FP32, "
                  "24 GB GDDR6, 300 GB/s, 72 W; 58 SMs (7,424 CUDA cores, 128 per Ada SM); nvidia-smi ~23,034 MiB",
        "efficiency_source": "matmul: assumption, not measured: the same 70-W power class as the T4, so well below "
                             "peak, but a 4 nm chip does more per watt than the T4's 12 nm; we take 50%. "
                             "bandwidth: " + _BW,
    },
    "A100-40GB": {
        "gpu": "NVIDIA A100 40GB SXM4 (Ampere GA100, sm 8.0, 400 W)",
        "tensor_tflops": 312.0, "fp32_tflops": 19.5, "bandwidth_gbs": 1555.0, "memory_gb": 40, "usable_gib": 40.0,
        "sms": 108, "amp": "bfloat16",
        "matmul_efficiency": 0.75, "bandwidth_efficiency": 0.80,
        "source": "NVIDIA A100 datasheet: 312 TFLOPS BF16/FP16 tensor dense (624 sparse), 19.5 TFLOPS FP32, "
                  "40 GB HBM2 at 1,555 GB/s; 108 SMs",
        "efficiency_source": "matmul: assumption, not measured here: large cuBLAS bf16 GEMMs are commonly reported at "
                             "230-280 TFLOPS on an A100; we take 75%. bandwidth: " + _BW,
    },
    "A100-80GB": {
        "gpu": "NVIDIA A100 80GB SXM4 (Ampere GA100, sm 8.0, 400 W)",
        "tensor_tflops": 312.0, "fp32_tflops": 19.5, "bandwidth_gbs": 2039.0, "memory_gb": 80, "usable_gib": 80.0,
        "sms": 108, "amp": "bfloat16",
        "matmul_efficiency": 0.75, "bandwidth_efficiency": 0.80,
        "source": "NVIDIA A100 datasheet: 312 TFLOPS BF16/FP16 tensor dense, 19.5 TFLOPS FP32, 80 GB HBM2e at "
                  "2,039 GB/s (SXM; the PCIe card has 1,935 GB/s); 108 SMs",
        "efficiency_source": "as A100-40GB",
    },
    "H100": {
        "gpu": "NVIDIA H100 SXM5 80GB HBM3 (Hopper GH100, sm 9.0, 700 W)",
        "tensor_tflops": 989.0, "fp32_tflops": 67.0, "bandwidth_gbs": 3350.0, "memory_gb": 80, "usable_gib": 79.6,
        "sms": 132, "amp": "bfloat16",
        "matmul_efficiency": 0.70, "bandwidth_efficiency": 0.80,
        "source": "NVIDIA H100 datasheet, SXM column: 1,979 TFLOPS BF16 tensor with sparsity (989 dense), 67 TFLOPS "
                  "FP32, 80 GB HBM3 at 3.35 TB/s; 132 SMs; nvidia-smi shows 81,559 MiB. The same 989 is "
                  "bench/common.py's peak and BENCHMARKS.md's MFU denominator.",
        "efficiency_source": "matmul: " + _EFF_H100 + " bandwidth: " + _BW,
    },
    "H200": {
        "gpu": "NVIDIA H200 SXM 141GB HBM3e (Hopper GH100, sm 9.0)",
        "tensor_tflops": 989.0, "fp32_tflops": 67.0, "bandwidth_gbs": 4800.0, "memory_gb": 141, "usable_gib": 140.4,
        "sms": 132, "amp": "bfloat16",
        "matmul_efficiency": 0.70, "bandwidth_efficiency": 0.80,
        "source": "NVIDIA H200 datasheet: the H100 SXM's compute (1,979 TFLOPS BF16 sparse, 989 dense; 67 FP32) "
                  "with 141 GB HBM3e at 4.8 TB/s; nvidia-smi shows about 143,771 MiB",
        "efficiency_source": "as H100",
    },
}

# --chips A100 means both memory sizes
CHIP_ALIASES = {"A100": ["A100-40GB", "A100-80GB"]}

# torch.cuda.get_device_name() -> chip of the table. Only names whose compute and memory match an
# entry: an H100 PCIe (756 TFLOPS, 2.0 TB/s) or NVL is a different chip and gets None.
DEVICE_NAMES: list[tuple[str, str]] = [
    (r"\bT4\b", "T4"),
    (r"\bL4\b", "L4"),
    (r"A100.*80\s*GB", "A100-80GB"),
    (r"A100", "A100-40GB"),  # "NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB" (the same 1,555 GB/s)
    (r"H100(?!.*(PCIe|NVL))", "H100"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"H200(?!.*NVL)", "H200"),
]

# =====================================================================================
# Every other constant of the model, with where it comes from
# =====================================================================================

ASSUMPTIONS: dict[str, dict] = {
    # ---- what an op costs ------------------------------------------------------------
    "flops": {"value": "torch.utils.flop_counter formulas",
              "why": "FLOPs of matmuls (mm, addmm, bmm, baddbmm) and attention (flash / efficient, forward and "
                     "backward) from PyTorch's own registry of FLOP formulas, 2 per multiply-add. Elementwise "
                     "arithmetic is not counted: those ops are bandwidth-bound by far, and their bytes decide "
                     "their time. Causal attention is counted over the full T x T square, as flash attention "
                     "computes it at T = 128 (one 128-row tile: nothing to skip)."},
    "bytes": {"value": "distinct inputs read + outputs and in-place inputs written",
              "why": "An op reads each distinct input tensor once and writes each output once (in-place ops write "
                     "the tensor they change), at the traced dtype; a broadcast dimension (stride 0) counts once. "
                     "Gather-like ops read what they pick: an embedding its looked-up rows, nll_loss one "
                     "log-probability per token (its backward does not read them at all). "
                     "Views, reshapes, transposes and detach move no bytes and launch no kernel. Caches are "
                     "ignored: every op goes to DRAM and back, which overstates small ops whose data stays in L2 "
                     "(40-50 MB on L4, A100, H100)."},
    "op_time": {"value": "max(compute, memory) + overhead, summed, no overlap",
                "why": "The roofline of each op plus its launch overhead, added up: the CPU issuing ops and the GPU "
                       "running them are assumed not to overlap, which is pessimistic when kernels are long. The "
                       "optimistic other end, full overlap, max(sum of GPU time, sum of CPU overhead), is in the "
                       "JSON as tok_s_overlapped; a real run lies between the two."},
    "tile": {"value": 128,
             "why": "Output tile (rows x columns) one SM computes per wave in cuBLAS / flash attention. A matmul "
                    "with t tiles on a chip with s SMs runs ceil(t / s) waves, so its compute rate is scaled by "
                    "t / (s * ceil(t / s)) (NVIDIA's 'Matrix Multiplication Background' guide: wave "
                    "quantization). Applied to compute only; small matmuls are bandwidth- or launch-bound anyway."},
    "split_k_min": {"value": 512,
                    "why": "A matmul with fewer output tiles than SMs but a long K (the weight gradients: K = the "
                           "micro-batch's tokens) is split along K by cuBLAS's heuristics; we let it split into "
                           "slices of at least 512 until the SMs are full. An assumption about cuBLAS, not measured."},
    "misaligned_factor": {"value": 0.5,
                          "why": "A tensor-core matmul with a dimension or row stride that is not a multiple of 8 "
                                 "elements (16 bytes in fp16/bf16) falls back to slower kernels (NVIDIA Deep "
                                 "Learning Performance Guide, 'Tensor Core Requirements'); we halve its rate. This "
                                 "is the unpadded 50,257-row output layer of the 'seed' and 'cpu' presets."},
    # ---- launch and host overheads -----------------------------------------------------
    "eager_op_us": {"value": 7.0,
                    "why": "CPU time per eager PyTorch op that launches a kernel: Python, the dispatcher, autograd "
                           "bookkeeping and cudaLaunchKernel. Write-ups of the dispatch path put it at 5-25 us per op "
                           "(e.g. jiahuanglin.xyz, 'From PyTorch op to kernel launch'); we take 7 us, the low end, "
                           "for a fast server CPU. A slow 2-vCPU Colab host will be slower."},
    "eager_extra_launch_us": {"value": 2.0,
                              "why": "Each further kernel of one multi-kernel op (fused AdamW and foreach ops launch "
                                     "one kernel per chunk of tensors): only cudaLaunchKernel, 1-3 us."},
    "eager_view_us": {"value": 2.0,
                      "why": "CPU time of an eager view / reshape / detach / allocation: no kernel, but Python, the "
                             "dispatcher and autograd's view tracking still run."},
    "compiled_kernel_us": {"value": 4.0,
                           "why": "Per kernel of a torch.compile (Inductor) graph without CUDA graphs, the mode "
                                  "TrainConfig(compile=True) uses: the generated wrapper calls each Triton or cuBLAS "
                                  "kernel directly (launcher plus cudaLaunchKernel, a few us); views cost nothing."},
    "cudagraph_replay_us": {"value": 30.0,
                            "why": "Per compiled forward or backward under CUDA graphs (TrainConfig.cuda_graphs, "
                                   "torch.compile's 'reduce-overhead'), in place of every kernel's launch: "
                                   "cudaGraphLaunch plus the bookkeeping of PyTorch's CUDA-graph trees (copying the "
                                   "batch into the graph's own input, checking which earlier outputs are alive). An "
                                   "estimate, not measured. The kernels' GPU time is unchanged; the gaps of a few "
                                   "hundred ns between the kernels of a graph are not counted. The optimizer and "
                                   "the step's tail stay eager."},
    "compiled_graph_call_us": {"value": 50.0,
                               "why": "Per call of a compiled graph (forward, backward, evaluation forward): Dynamo's "
                                      "guards and AOTAutograd's runtime wrapper. An estimate, not measured."},
    "sync_us": {"value": 10.0,
                "why": "A .item(): a device-to-host copy and a wait, on top of the op's launch overhead. (The wait "
                       "itself is what the no-overlap sum already assumes.)"},
    "multi_tensor_launches": {"value": "max(ceil(tensors / max_tensors[depth]), ceil(chunks / 320))",
                              "why": "Launches of one fused / foreach op on CUDA, from PyTorch's MultiTensorApply.cuh: "
                                     "chunks of 65,536 elements, at most 320 blocks and 110/64/48/36/30 tensors "
                                     "(for 1-5 tensor lists) per launch."},
    "host_batch_ms": {"value": [0.40, 0.0021],
                      "why": "CPU time of slm_utils.get_batch per micro-batch: 0.40 ms + 0.0021 ms per window, "
                             "measured on the 2-core Xeon VM (200 calls each for 1 to 256 windows of 128 tokens "
                             "from the Shakespeare train.bin; CPU part only, a GPU adds one pinned ~100 KB copy). "
                             "Not overlapped: train_step ends with .item(), so the GPU idles while the next "
                             "batches are cut."},
    "host_step_ms": {"value": 0.1,
                     "why": "train()'s bookkeeping per optimizer step (the lr of every group, six history lists, "
                            "tqdm's counter). An estimate, not measured."},
    # ---- compile ---------------------------------------------------------------------
    "compiled_fusion": {"value": "runs between matmuls fuse by loop size, reductions over rows apart; "
                                 "bytes by dataflow",
                        "why": "In compiled mode the model's forward and backward (what torch.compile(model) "
                               "compiles) keep every matmul and attention kernel. The other ops between two of them "
                               "fuse into one kernel per loop size: ops over the same number of elements (within 1%, "
                               "a padded width) share a kernel, so a weight's cast to bf16 or its gradient's cast "
                               "back to fp32 is a kernel apart from the activations' work beside it. A kernel reads "
                               "each tensor it did not produce once, and writes only the tensors used after it (by a "
                               "later op, another kernel, the backward, or the optimizer); intermediate tensors stay "
                               "in registers. A row reduction (a norm, a softmax) shares its loop's kernel, one more "
                               "per further one. A reduction over rows (a weight or bias gradient) is a kernel of its "
                               "own, split in two when it leaves fewer than split_outputs_per_sm x SMs outputs; a row "
                               "reduction splits in two when it leaves fewer than 2 per SM and is longer than "
                               "split_row_reduction_min (Inductor's rules, torch/_inductor/ir.py and choices.py). The "
                               "compiled forward does not keep the loss's fp32 log-probabilities for the backward: "
                               "they are recomputed from the logits, which the forward reads a second time (the fused "
                               "head + loss reads each chunk's logits twice too: the softmax's two passes over a "
                               "50K-wide row). What is priced compiled is the code torch.compile receives, where it "
                               "differs from eager (the fused head + loss out of place, not in place). Checked "
                               "against Inductor's own scheduler lowered for a stand-in GPU on the CPU "
                               "(bench/inductor_groups.py --as-gpu; BENCHMARKS.md section 8). The optimizer step, "
                               "gradient clipping and the loss bookkeeping of train_step stay eager, as in train(), "
                               "which compiles the model only. Compile warm-up is not included (about 24 s on the "
                               "H100, BENCHMARKS.md section 5)."},
    "split_outputs_per_sm": {"value": 64,
                             "why": "Inductor splits a reduction that leaves fewer than SMs x 2 x 32 outputs "
                                    "(torch/_inductor/ir.py, Reduction.num_splits) into two kernels."},
    "split_row_reduction_min": {"value": 8192,
                                "why": "Inductor splits a row reduction only when it leaves fewer than 2 outputs "
                                       "per SM and is longer than 8,192 elements (choices.py, reduction_split_factor; "
                                       "before sm100)."},
    "autocast": {"value": "emulated CUDA autocast",
                 "why": "Inputs of linear / matmul / mm / bmm / addmm / baddbmm / SDPA are cast to the autocast dtype "
                        "(bf16; fp16 on a T4, same bytes), weights once per micro-batch (autocast caches casts of "
                        "leaf tensors that require grad); softmax / log_softmax / cross-entropy / layer_norm / exp / "
                        "log / pow run in fp32, as CUDA autocast's op lists say. The residual stream and norms stay "
                        "fp32, matmul outputs are bf16. On a T4 the GradScaler adds an unscale pass over the "
                        "gradients (read + write) and a sync per step, priced analytically."},
    # ---- evaluation, checkpoints, decoding ------------------------------------------------
    "evaluations": {"value": "as train(): at every eval_interval-th step and at the last step",
                    "why": "Each evaluation is slm_utils.estimate_loss over eval_tokens // block_size fixed windows "
                           "in batches of eval_batch_size, forward only, autocast, a .item() per batch; traced once "
                           "per batch and multiplied."},
    "checkpoint": {"value": "best.pt at every evaluation; last.pt at every one, or on the last_every_s timer",
                   "why": "train() writes best.pt when val improves and last.pt at every evaluation, or, with "
                          "TrainConfig.last_every_s, once that many seconds have passed and at the end. We assume val "
                          "improves every time (an upper bound; true early on, and mostly for the presets' "
                          "patience of 1000). last.pt = fp32 weights + the optimizer state as traced (AdamW: 2 fp32 "
                          "moments; Muon: 1 fp32 momentum for its matrices); best.pt = the fp32 weights alone with "
                          "best_weights_only (the default), else the same bytes as last.pt. Each file is serialized, "
                          "hashed and written; last.pt's writes are counted from the projected run time."},
    "serialize_gbs": {"value": 0.55,
                      "why": "torch.save of a 360 MB state dict into a BytesIO, measured on the 2-core Xeon VM "
                             "(0.55 GB/s); a Colab host is of the same class."},
    "hash_gbs": {"value": 0.59, "why": "hashlib.sha256 over 360 MB, measured on the 2-core Xeon VM (0.59 GB/s)."},
    "snapshot_gbs": {"value": 1.5,
                     "why": "With TrainConfig.background_checkpoints the training thread only copies the state to "
                            "host memory (746 MB in 0.5 s on the 2-core Xeon VM: bench/bench_checkpoint.py); "
                            "serializing, hashing and writing overlap with training, and count only where they "
                            "take longer than the time to the next evaluation. A GPU's copy crosses PCIe, "
                            "usually faster than this host copy, so this is the conservative end."},
    "write_gbs": {"value": {"local": 1.0, "drive": 0.03},
                  "why": "Write bandwidth with fsync: 1 GB/s for a local SSD; 30 MB/s for a mounted Google Drive "
                         "(the notebook's SAVE_TO_DRIVE); both assumed, not measured. total_s uses 'local'; "
                         "total_s_drive uses Drive."},
    "decode": {"value": "batch 1, greedy, KV cache half full, fp32, uncompiled",
               "why": "One cached step of GPT.generate_stream: a one-token forward against a KV cache holding "
                      "block_size / 2 tokens, argmax, and the torch.cat that appends the token. generate runs the "
                      "model as it is, without autocast (fp32 weights and cache: fp32 matmuls) and never compiled, so "
                      "the compiled column repeats the eager figure."},
    "memory": {"value": "(static + traced peak of live tensors) x memory_slack + cuda_context_gib",
               "why": "Static: fp32 weights and buffers, the optimizer state and the batch. Traced: the tracer follows "
                      "every tensor the step allocates until its storage is freed (autograd's saved tensors, "
                      "gradients, autocast copies, the logits and their gradients), and takes the high-water mark. "
                      "This is eager's peak; compile can lower it by recomputing instead of saving. A chip fits the "
                      "step when the result is at most its usable_gib."},
    "memory_slack": {"value": 1.10,
                     "why": "The CUDA caching allocator rounds blocks up and fragments; 10% is an estimate."},
    "cuda_context_gib": {"value": 0.5,
                         "why": "The CUDA context, cuBLAS workspaces and kernels' own memory outside PyTorch's "
                                "allocator: a few hundred MB; 0.5 GiB is an estimate."},
    "mfu": {"value": "(6 N + 12 L C T) x tokens/s / dense tensor peak",
            "why": "BENCHMARKS.md's definition: N = parameters that multiply activations (every parameter except "
                   "the position table, and except the token table when the head is untied: an embedding lookup is "
                   "not a matmul; tied, the matrix counts once, as the head), 12 L C T = attention's QK^T and AV "
                   "over the full window. Against the datasheet peak, not the achievable one."},
    "not_modelled": {"value": "see why",
                     "why": "L2-cache reuse; CPU/GPU overlap (see op_time); the host CPU's speed (a Colab T4's 2 vCPUs "
                            "issue ops more slowly than the H100 server's); the curriculum of the 'cpu' preset "
                            "(its first 200 steps use shorter windows at the same tokens: slightly cheaper); "
                            "thermal throttling beyond the efficiencies; compile warm-up; dataloader jitter; the "
                            "first step's allocations; the evaluation windows' host-to-device copies (~130 KB a "
                            "batch)."},
}


def _a(key: str):
    return ASSUMPTIONS[key]["value"]


# =====================================================================================
# The notebook side: what a run is expected to take (json and pathlib only)
# =====================================================================================


def chip_for_device_name(name: str | None) -> str | None:
    """The ``CHIPS`` key for a ``torch.cuda.get_device_name()`` string, or None when not in the table."""
    if not name:
        return None
    for pattern, chip in DEVICE_NAMES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return chip
    return None


def _evaluations(max_steps: int, eval_interval: int) -> int:
    """How many times train() evaluates: at every eval_interval-th step, and at the last step."""
    return max_steps // eval_interval + (1 if max_steps % eval_interval else 0)


def _scaled_run(run: dict, max_steps: int) -> dict:
    """The evaluation schedule of ``slm_utils.scale_schedule(cfg, max_steps)``, in plain arithmetic."""
    ratio = max_steps / run["max_steps"]
    interval = max(1, round(run["eval_interval"] * ratio))
    fewest = min(run["eval_tokens"], 64 * run["block_size"])
    eval_tokens = min(run["eval_tokens"], max(fewest, round(run["eval_tokens"] * ratio)))
    return {"max_steps": max_steps, "eval_interval": interval, "eval_tokens": eval_tokens,
            "evaluations": _evaluations(max_steps, interval),
            "eval_batches": math.ceil((eval_tokens // run["block_size"]) / run["eval_batch_size"])}


def expected_time(preset_name: str, gpu_name: str, path: str | Path | None = None,
                  max_steps: int | None = None, split: tuple[int, int] | None = None) -> dict | None:
    """The projected time of a preset's run on the GPU named ``gpu_name``, or None.

    ``gpu_name`` is what ``torch.cuda.get_device_name()`` returns ("Tesla T4", "NVIDIA L4",
    "NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200"). ``max_steps`` gives the
    time of a shortened run (``slm_utils.scale_schedule``: the same number of evaluations, on
    fewer tokens). ``split`` is the run's (batch_size, grad_accum_steps) when it is not the
    preset's (``slm_utils.device_batch`` regroups on a large GPU): its training step is then priced
    from the projection's micro-batch sweep, which holds the "t4" preset; a split the sweep lacks
    keeps the preset's figures, and ``split_note`` says so. Returns None for a GPU not in the
    table, a preset not projected, or a missing ``projection.json``. The dict holds ``chip``,
    ``split``, ``eager`` and ``compiled`` (each with ``tok_s``, ``train_s``, ``eval_s``,
    ``ckpt_s``, ``total_s``...) and a one-line ``summary``.
    """
    chip = chip_for_device_name(gpu_name)
    if chip is None:
        return None
    try:
        data = json.loads(Path(path or DEFAULT_OUT).read_text())
    except (OSError, ValueError):
        return None
    entry = data.get("presets", {}).get(preset_name, {}).get(chip)
    run = data.get("runs", {}).get(preset_name)
    if not entry or not run:
        return None
    preset_split = (run["batch_size"], run["grad_accum_steps"])
    row, note = None, None
    if split is not None and tuple(split) != preset_split:
        sweep = data.get("sweep") or {}
        if sweep.get("preset") == preset_name:
            row = next((r for r in sweep["rows"] if (r["batch_size"], r["grad_accum_steps"]) == tuple(split)
                        and chip in r["tok_s"]), None)
        if row is None:
            note = (f"priced at the preset's {preset_split[0]} x {preset_split[1]} micro-batches; this run's "
                    f"{split[0]} x {split[1]} is not in the projection's sweep")
    out = {"chip": chip, "gpu_name": gpu_name, "preset": preset_name, "generated": data.get("generated"),
           "max_steps": max_steps or run["max_steps"], "split": tuple(split) if row else preset_split,
           "split_note": note}
    schedule = _scaled_run(run, max_steps) if max_steps and max_steps != run["max_steps"] else None
    if row and schedule is None:  # the preset's own schedule, repriced at another step time
        schedule = {k: run[k] for k in ("max_steps", "evaluations", "eval_batches")}
    for mode in ("eager", "compiled"):
        e = dict(entry[mode])
        if row:
            rates = row["tok_s"][chip]
            e = _resplit(e, rates[mode], run["tokens_per_step"], row, chip, mode)
            if "calibrated" in e:
                if f"{mode}_calibrated" in rates:
                    e["calibrated"] = _resplit(dict(e["calibrated"]), rates[f"{mode}_calibrated"],
                                               run["tokens_per_step"], row, chip, mode)
                else:  # never leave the preset's split priced beside this one
                    del e["calibrated"]
        if schedule:
            e = _rescale(e, schedule)
            if "calibrated" in e:
                e["calibrated"] = _rescale(dict(e["calibrated"]), schedule)
        out[mode] = e

    def minutes(mode: str) -> str:
        e = out[mode]
        low, high = sorted([e["total_s"] / 60, e.get("calibrated", e)["total_s"] / 60])
        if high < 1:
            return "<1"  # not "~0" or "~0-1"
        return f"~{low:.0f}" if round(low) == round(high) else f"~{low:.0f}-{high:.0f}"

    at = f" at {out['split'][0]} x {out['split'][1]} micro-batches" if row else ""
    out["summary"] = (f"expected {minutes('eager')} min eager, {minutes('compiled')} min compiled (+ compile warm-up) "
                      f"on {chip} for {out['max_steps']:,} steps of '{preset_name}'{at} (roofline projection in "
                      "bench/projection.json, a priori to H100-calibrated; not a measurement)")
    return out


def _resplit(e: dict, tok_s: float, tokens_per_step: int, row: dict, chip: str, mode: str) -> dict:
    """A preset's projected figures with the training step of another micro-batch split (a sweep
    row); the parts of the step the sweep does not keep are dropped rather than left stale."""
    e["mfu"] = e.get("mfu", 0.0) * tok_s / e["tok_s"]
    e["tok_s"], e["step_ms"] = tok_s, 1e3 * tokens_per_step / tok_s
    for key in ("gpu_ms", "overhead_ms", "host_ms", "tok_s_overlapped"):
        e.pop(key, None)
    if "peak_gib" in e:
        e["peak_gib"], e["fits"] = row["peak_gib"], fits(row["peak_gib"], CHIPS[chip])
    if "kernels_per_step" in e:
        e["kernels_per_step"] = row["tok_s"][chip].get(f"{mode}_kernels")
    return e


def _rescale(e: dict, s: dict) -> dict:
    """A preset's projected times for the shortened schedule ``s`` (see ``_scaled_run``)."""
    e["train_s"] = e["step_ms"] / 1e3 * s["max_steps"]
    e["eval_s"] = e["eval_batch_ms"] / 1e3 * s["eval_batches"] * s["evaluations"]
    e["ckpt_s"] = e["ckpt_s_per_eval"] * s["evaluations"]
    e["ckpt_s_drive"] = e["ckpt_s_drive_per_eval"] * s["evaluations"]
    e["total_s"] = e["train_s"] + e["eval_s"] + e["ckpt_s"]
    e["total_s_drive"] = e["train_s"] + e["eval_s"] + e["ckpt_s_drive"]
    return e


# =====================================================================================
# Tracing on the meta device (torch is imported here, lazily)
# =====================================================================================

_MAX_TENSORS_PER_LAUNCH = (110, 64, 48, 36, 30)  # MultiTensorApply.cuh, per number of tensor lists
_CHUNK, _MAX_BLOCKS = 65536, 320
_MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
_ALLOCS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
# same-shape ops that still reduce along a dimension: a kernel boundary for Inductor
_REDUCING = ("softmax", "log_softmax", "layer_norm", "rms_norm", "cumsum", "nll_loss", "norm", "sum", "mean",
             "amax", "argmax", "var", "embedding_dense_backward")
# ops that pick or place elements rather than reduce them: each is one loop over its output (the
# embedding's backward, a scatter-add into the table, too)
_GATHERS = {"embedding", "embedding_dense_backward", "gather", "index", "index_select", "nll_loss_backward",
            "slice_backward"}
# Inductor never splits a reduction of at most this many elements (its min_elements_per_thread)
_MIN_SPLIT_LENGTH = 32


class Reduction(NamedTuple):
    """One reduction of a traced op, as Inductor would loop over it."""

    outputs: int  # elements it leaves
    length: int  # elements summed into each
    inner: bool  # along the last dimension(s), a row (norms, softmax); not over rows (weight gradients)
    count: int  # outputs of this shape the op returns (layer norm's weight and bias gradients: 2)


class Op:
    """One traced op: what it computes, what it moves, where in the step it ran."""

    __slots__ = ("index", "name", "region", "micro", "kind", "flops", "read", "write", "tensor_core",
                 "misaligned", "tiles", "k", "launches", "reduction", "reads", "writes", "space", "reductions",
                 "logits")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))

    @property
    def bytes(self) -> int:
        return self.read + self.write


class Trace:
    """The ops of a traced piece of work, plus its memory figures."""

    def __init__(self, ops: list[Op], peak_live: int = 0, static: int = 0, saved: int = 0, **info):
        self.ops, self.peak_live, self.static, self.saved, self.info = ops, peak_live, static, saved, info
        self.last_read: dict[int, int] = {}
        for op in ops:
            for uid in op.reads:
                self.last_read[uid] = op.index

    def select(self, regions=None, micro=None) -> list[Op]:
        return [op for op in self.ops if (regions is None or op.region in regions)
                and (micro is None or op.micro == micro)]

    def flops(self, regions=None, micro=None) -> float:
        return sum(op.flops for op in self.select(regions, micro))

    def bytes(self, regions=None, micro=None) -> int:
        return sum(op.bytes for op in self.select(regions, micro) if op.kind not in ("view", "alloc"))


def _machinery():
    """Build, once, everything that needs torch: the stand-in RMSNorm op and the two modes."""
    cached = globals().get("_MACHINERY")
    if cached is not None:
        return cached
    import itertools
    import types
    import weakref

    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves, tree_map
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    low_precision = (torch.float16, torch.bfloat16)

    # ---- RMSNorm as one op, as CUDA runs it (aten._fused_rms_norm decomposes on meta) ----
    if not hasattr(torch.ops.projgpu, "rms_norm"):
        def _no_kernel(*args):
            raise RuntimeError("projgpu ops are stand-ins for CUDA kernels: they only run on the meta device")

        rms = torch.library.custom_op("projgpu::rms_norm", _no_kernel, mutates_args=(),
                                      schema="(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)")
        rms.register_fake(lambda x, weight, eps: (torch.empty_like(x),
                                                  x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)))
        rms_bwd = torch.library.custom_op(
            "projgpu::rms_norm_backward", _no_kernel, mutates_args=(),
            schema="(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)")
        rms_bwd.register_fake(lambda grad, x, weight, rstd: (torch.empty_like(x), torch.empty_like(weight)))

        def setup_context(ctx, inputs, output):
            x, weight, _ = inputs
            ctx.save_for_backward(x, weight, output[1])  # what the CUDA kernel saves: input, weight, rstd
            ctx.set_materialize_grads(False)

        def backward(ctx, grad, _grad_rstd):
            x, weight, rstd = ctx.saved_tensors
            gx, gw = torch.ops.projgpu.rms_norm_backward(grad, x, weight, rstd)
            return gx, gw, None

        rms.register_autograd(backward, setup_context=setup_context)

    class State:
        """What the hooks tell the tracer: which part of the step is running, and which micro-batch."""

        def __init__(self, autocast=None, force_autocast=False, tail_on_sync=False, vocab_widths=()):
            self.autocast, self.force_autocast, self.tail_on_sync = autocast, force_autocast, tail_on_sync
            self.vocab_widths = tuple(vocab_widths)  # the logits' last dimension: the vocabulary, padded or not
            self.region, self.micro = "glue", -1
            self.cast_cache = {}  # autocast's cache of weight casts: emptied when the forward returns

    class GPUFunctionMode(TorchFunctionMode):
        """Calls what a CUDA build would: autocast's casts, flash / efficient SDPA, fused RMSNorm, fused dropout."""

        LOWER = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
                 torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm}
        FP32 = {F.softmax, F.log_softmax, F.cross_entropy, F.nll_loss, F.layer_norm, torch.exp, torch.Tensor.exp,
                torch.log, torch.Tensor.log, torch.pow, torch.Tensor.pow}

        def __init__(self, state):
            super().__init__()
            self.state = state

        def _autocasting(self) -> bool:
            # train_step's autocast covers the model's forward, not the backward or the optimizer.
            # Grad mode tells them apart, except inside an autograd.Function's forward (the fused
            # head + loss), where grad mode is off but autocast still applies
            return self.state.autocast is not None and (
                self.state.force_autocast or torch.is_grad_enabled()
                or (self.state.region == "forward" and torch._C._current_autograd_node() is None))

        def _cast(self, t, dtype):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
                return t
            if dtype == torch.float32 and t.dtype not in low_precision:
                return t
            if t.is_leaf and t.requires_grad:  # a weight: cast once per micro-batch, as autocast caches it
                cache = self.state.cast_cache
                key = (id(t), dtype)
                if key not in cache:
                    cache[key] = t.to(dtype)
                return cache[key]
            return t.to(dtype)

        def __torch_function__(self, func, types_, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                return self._sdpa(*args, **kwargs)
            if func is F.rms_norm:
                return self._rms_norm(*args, **kwargs)
            if func is F.dropout:
                return self._dropout(*args, **kwargs)
            if self._autocasting() and func in (F.softmax, F.log_softmax) and kwargs.get("dtype") is None \
                    and len(args) < 4:
                # autocast's fp32_set_opt_dtype policy: the same kernel, told to compute in fp32
                return func(*args, **{**kwargs, "dtype": torch.float32})
            if self._autocasting() and (func in self.LOWER or func in self.FP32):
                dtype = self.state.autocast if func in self.LOWER else torch.float32
                args, kwargs = tree_map(lambda t: self._cast(t, dtype), (args, kwargs))
            return func(*args, **kwargs)

        def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            if self._autocasting():
                q, k, v = (self._cast(t, self.state.autocast) for t in (q, k, v))
            if attn_mask is not None or enable_gqa:  # not what slm_utils calls: leave it to PyTorch
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                      is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
            if q.dtype in low_precision:  # flash attention (sm80+; a T4 runs the efficient kernel, same cost here)
                return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
            need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            return aten._scaled_dot_product_efficient_attention(q, k, v, None, need_lse, dropout_p, is_causal,
                                                                scale=scale)[0]

        def _rms_norm(self, x, normalized_shape, weight=None, eps=None):
            if weight is None or len(normalized_shape) != 1 or weight.dtype != x.dtype:
                return F.rms_norm(x, normalized_shape, weight, eps)
            return torch.ops.projgpu.rms_norm(x, weight, torch.finfo(x.dtype).eps if eps is None else eps)[0]

        def _dropout(self, x, p=0.5, training=True, inplace=False):
            if not training or p == 0.0:
                return x
            if inplace or not 0.0 < p < 1.0:
                return F.dropout(x, p, training, inplace)
            return aten.native_dropout(x, p, True)[0]  # CUDA's one fused kernel (meta would take the CPU path)

    def _distinct_bytes(t) -> int:
        """Bytes a kernel touches for ``t``: its elements, a broadcast (stride-0) dimension once."""
        n = 1
        for size, stride in zip(t.shape, t.stride()):
            if stride != 0:
                n *= size
        return n * t.element_size()

    def _loops(name, inputs, outputs, args, reduction: bool) -> tuple[int, tuple]:
        """How Inductor would loop over a pointwise or reducing op: (space, reductions). ``space`` is
        the number of elements its loop visits (a reduction visits its input); ``reductions`` holds a
        ``Reduction`` per distinct reduction it does."""
        out_numel = max((t.numel() for t in outputs), default=0)
        if name == "nll_loss_forward":  # one picked element per target row, summed
            return args[1].numel(), (Reduction(1, args[1].numel(), True, 1),)
        if not reduction or name in _GATHERS or not inputs:
            return out_numel, ()
        x = max(inputs, key=lambda t: t.numel())
        if x.numel() == 0:
            return 0, ()
        found: dict[tuple, int] = {}
        for o in outputs:
            if o.numel() >= x.numel():
                continue
            lead = list(o.shape)
            while lead and lead[-1] == 1:
                lead.pop()  # keepdim
            key = (o.numel(), x.numel() // max(o.numel(), 1), lead == list(x.shape[:len(lead)]))
            found[key] = found.get(key, 0) + 1
        if any(r in name for r in _REDUCING) and x.dim() and out_numel >= x.numel() and not any(
                inner for _, _, inner in found):
            found[(x.numel() // x.shape[-1], x.shape[-1], True)] = 1  # a row reduction inside a same-shape op
        return max(x.numel(), out_numel), tuple(Reduction(*key, n) for key, n in found.items())

    def _gathered_reads(name, args, inputs, outputs):
        """(tensor, bytes read) of an op's inputs. Gather-like ops read only what they pick: the
        embedding its looked-up rows, nll_loss one log-probability per row, gather and indexing
        as many elements as they return; nll_loss's backward takes the log-probabilities for their
        shape only, and an indexed write reads the values it puts."""
        if name == "embedding":  # (weight, indices): rows of the table, as many as the output holds
            return [(args[0], _distinct_bytes(outputs[0])), (args[1], _distinct_bytes(args[1]))]
        if name in ("gather", "index"):  # (self, [dim,] index...): one element of self per output element
            return [(args[0], outputs[0].numel() * args[0].element_size())] + [
                (t, _distinct_bytes(t)) for t in inputs if t is not args[0]]
        if name == "index_put_":  # (self, indices, values): self only where written (see _scattered_write)
            return [(t, _distinct_bytes(t)) for t in inputs if t is not args[0]]
        if name == "nll_loss_forward":  # (self, target, ...): one element of self per target
            return [(args[0], args[1].numel() * args[0].element_size())] + [
                (t, _distinct_bytes(t)) for t in inputs if t is not args[0]]
        if name == "nll_loss_backward":  # (grad_output, self, target, ...)
            return [(t, _distinct_bytes(t)) for t in inputs if t is not args[1]]
        return [(t, _distinct_bytes(t)) for t in inputs]

    def _aligned(t) -> bool:
        return all(s % 8 == 0 for s in t.stride() if s not in (0, 1))

    class Recorder(TorchDispatchMode):
        """Records every aten op with its FLOPs, bytes and storages, and follows live memory."""

        def __init__(self, state):
            super().__init__()
            self.state, self.ops = state, []
            self._uids = itertools.count()
            self._live: dict[int, list] = {}  # StorageImpl address -> [uid, bytes counted as allocated here]
            self.live_bytes = self.peak_bytes = 0
            self.saved: dict[int, int] = {}  # uid -> bytes, tensors saved for backward in micro-batch 0

        # -- storages: a uid per storage, and the live bytes of those allocated during the trace --
        def _uid(self, t, allocate: bool) -> int:
            s = t.untyped_storage()
            entry = self._live.get(s._cdata)
            if entry is None:
                nbytes = s.nbytes() if allocate else 0
                entry = self._live[s._cdata] = [next(self._uids), nbytes]
                self.live_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                # storages keep their Python object while anything (autograd's saved tensors too) holds
                # them, so this runs exactly when the memory would return to the allocator
                weakref.finalize(s, self._free, s._cdata, entry[0])
            return entry[0]

        def _free(self, address: int, uid: int):
            entry = self._live.get(address)
            if entry is not None and entry[0] == uid:
                self.live_bytes -= entry[1]
                del self._live[address]

        def pack(self, t):  # saved_tensors_hooks: what autograd keeps for the backward
            entry = self._live.get(t.untyped_storage()._cdata)
            if entry is not None and entry[1] and self.state.micro == 0:
                self.saved[entry[0]] = entry[1]
            return t

        def _region(self) -> str:
            if torch._C._current_autograd_node() is not None:
                return "backward"
            if self.state.tail_on_sync and self.state.region == "glue" and not torch.is_grad_enabled():
                return "backward"  # the engine's own gradient sums between nodes (grad mode is off there)
            return self.state.region

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "profiler":
                return func(*args, **kwargs)
            if func is aten._local_scalar_dense.default:  # .item(): answer it, and count a sync
                if self.state.tail_on_sync:
                    self.state.region = "tail"  # train_step reads the loss once, after its last micro-batch
                t = args[0]
                self._record(func, "sync", [t], [], [], 0.0)
                return True if t.dtype == torch.bool else (1 if not t.is_floating_point() else 1.0)
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            in_uids = {self._uid(t, allocate=False) for t in inputs}
            out = func(*args, **kwargs)
            outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            written = []
            for i, a in enumerate(func._schema.arguments):
                if a.alias_info is not None and a.alias_info.is_write:
                    if func.overloadpacket.__name__ in ("_fused_adamw_", "_fused_adam_") and a.name == "grads" \
                            and kwargs.get("grad_scale") is None:
                        continue  # the fused kernel only reads the gradients unless it unscales them
                    value = args[i] if i < len(args) else kwargs.get(a.name)
                    written += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
            out_uids = [self._uid(t, allocate=True) for t in outputs]  # new storages are allocations
            name = func.overloadpacket.__name__
            if name in _ALLOCS:
                kind = "alloc"
            elif outputs and not written and all(u in in_uids for u in out_uids):
                kind = "view"  # every output aliases an input: no kernel, no bytes
            elif name in _MATMULS:
                kind = "matmul"
            elif "attention" in name:
                kind = "attention"
            elif name.startswith(("_foreach_", "_fused_adam", "_amp_foreach")):
                kind = "multi"
            else:
                kind = "kernel"
            flops = 0.0
            formula = flop_registry.get(func.overloadpacket)
            if formula is not None:
                flops = float(formula(*args, **kwargs, out_val=out))
            self._record(func, kind, inputs, outputs + written, outputs, flops, args)
            return out

        def _record(self, func, kind, inputs, written, outputs, flops, args=()):
            reads, writes = {}, {}
            name = func.overloadpacket.__name__
            if kind not in ("view", "alloc"):
                for t in _gathered_reads(name, args, inputs, outputs):
                    uid = self._uid(t[0], allocate=False)
                    reads[uid] = max(reads.get(uid, 0), t[1])
                for t in written:
                    uid = self._uid(t, allocate=False)
                    nbytes = _distinct_bytes(t)
                    if name == "index_put_" and t is args[0]:  # an indexed write touches as many elements as it puts
                        nbytes = min(nbytes, args[2].numel() * t.element_size())
                    writes[uid] = max(writes.get(uid, 0), nbytes)
            tensor_core = misaligned = False
            tiles = launches = k = 1
            if kind == "matmul":
                a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
                tensor_core = a.dtype in low_precision and b.dtype in low_precision
                misaligned = a.shape[-1] % 8 != 0 or b.shape[-1] % 8 != 0 or not all(
                    _aligned(t) for t in (a, b, *outputs))
                o = outputs[0]
                batch = math.prod(o.shape[:-2]) if o.dim() > 2 else 1
                tiles = batch * math.ceil(o.shape[-2] / _a("tile")) * math.ceil(o.shape[-1] / _a("tile"))
                k = a.shape[-1]
            elif kind == "attention":
                q = next(t for t in args if isinstance(t, torch.Tensor) and t.dim() == 4)
                tensor_core = q.dtype in low_precision
                tiles = q.shape[0] * q.shape[1] * math.ceil(q.shape[2] / _a("tile"))
            elif kind == "multi":
                lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
                depth = min(len(lists), 5)
                chunks = sum(math.ceil(t.numel() / _CHUNK) for t in lists[0])
                launches = max(math.ceil(len(lists[0]) / _MAX_TENSORS_PER_LAUNCH[depth - 1]),
                               math.ceil(chunks / _MAX_BLOCKS))
            biggest_in = max((t.numel() for t in inputs), default=0)
            reduction = kind in ("kernel", "multi") and (
                any(r in name for r in _REDUCING) or (outputs and max(t.numel() for t in outputs) < biggest_in))
            space, reductions = _loops(name, inputs, outputs, args, bool(reduction))
            # works on logits: a tensor whose rows are as wide as the vocabulary (the head's weight,
            # vocabulary x width, has rows as wide as the model)
            logits = any(t.dim() >= 2 and t.shape[-1] in self.state.vocab_widths for t in (*inputs, *outputs))
            self.ops.append(Op(index=len(self.ops), name=name, region=self._region(), micro=max(self.state.micro, 0),
                               kind=kind, flops=flops, read=sum(reads.values()), write=sum(writes.values()),
                               tensor_core=tensor_core, misaligned=misaligned, tiles=tiles, k=k, launches=launches,
                               reduction=bool(reduction), reads=reads, writes=writes, space=space,
                               reductions=reductions, logits=logits))

    class PhaseOptimizer:
        """The optimizer, with its step marked as the 'optimizer' region of the trace."""

        def __init__(self, optimizer, state):
            self._optimizer, self._state = optimizer, state

        def __getattr__(self, name):
            return getattr(self._optimizer, name)

        def step(self, *args, **kwargs):
            previous, self._state.region = self._state.region, "optimizer"
            try:
                return self._optimizer.step(*args, **kwargs)
            finally:
                self._state.region = previous

    @contextlib.contextmanager
    def meta_acts_as_cuda():
        """Let fused AdamW and foreach ops (clip_grad_norm_) take meta tensors, as they take CUDA ones."""
        saved = []
        for module in [m for n, m in list(sys.modules.items()) if n.startswith("torch") and m is not None]:
            for attr in ("_get_fused_kernels_supported_devices", "_get_foreach_kernels_supported_devices"):
                original = getattr(module, attr, None)
                if callable(original) and not getattr(original, "_projgpu", False):
                    def patched(original=original):
                        return [*original(), "meta"]
                    patched._projgpu = True
                    saved.append((module, attr, original))
                    setattr(module, attr, patched)
        try:
            yield
        finally:
            for module, attr, original in saved:
                setattr(module, attr, original)

    @contextlib.contextmanager
    def regions(model, state):
        """Mark the model's forward as the 'forward' region; each call starts a micro-batch."""
        def pre(module, args):
            state.micro += 1
            state.region = "forward"

        def post(module, args, output):
            state.region = "glue"
            state.cast_cache.clear()  # autocast drops its casts when its region ends (autograd keeps what it saved)

        handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    machinery = types.SimpleNamespace(torch=torch, State=State, GPUFunctionMode=GPUFunctionMode, Recorder=Recorder,
                                      PhaseOptimizer=PhaseOptimizer, meta_acts_as_cuda=meta_acts_as_cuda,
                                      regions=regions)
    globals()["_MACHINERY"] = machinery
    return machinery


def _slm():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import slm_utils

    return slm_utils


def _meta_model(mcfg):
    S, torch = _slm(), _machinery().torch
    with torch.device("meta"):
        return S.GPT(mcfg)


@contextlib.contextmanager
def _compiled_form(compiled: bool):
    """A context in which the traced code takes the form torch.compile receives, where that differs
    from what eager runs (``compiled=False``: nothing changes). Inside the fused head + loss
    (``slm_utils._FusedLinearCrossEntropy.forward``) ``torch.compiler.is_compiling()`` then says True,
    and the trace holds its out-of-place form. Only there: torch's optimizers read the same flag."""
    if not compiled:
        yield
        return
    from unittest import mock

    S, torch = _slm(), _machinery().torch
    eager_forward = S._FusedLinearCrossEntropy.forward

    def forward(ctx, *args):
        with mock.patch.object(torch.compiler, "is_compiling", lambda: True):
            return eager_forward(ctx, *args)

    with mock.patch.object(S._FusedLinearCrossEntropy, "forward", staticmethod(forward)):
        yield


def _common():
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import common  # the benchmarks' FLOP count, so both MFUs share one numerator

    return common


def model_info(mcfg, block_size: int) -> dict:
    """Parameter counts and the MFU numerator (model FLOPs per token) of a model shape."""
    model = _meta_model(mcfg)
    common = _common()
    return {"params": _slm().count_parameters(model)["total"], "matmul_params": common.matmul_parameters(model),
            "model_flops_per_token": common.flops_per_token(model, block_size)}


def trace_forward(mcfg, batch_size: int, seq_len: int | None = None, amp: bool = True) -> Trace:
    """One training-mode forward with the loss, autocast on (for tests and quick looks)."""
    M, torch = _machinery(), _machinery().torch
    model = _meta_model(mcfg).train()
    T = seq_len or mcfg.block_size
    x = torch.zeros(batch_size, T, dtype=torch.long, device="meta")
    state = M.State(autocast=torch.bfloat16 if amp else None)
    rec = M.Recorder(state)
    with M.regions(model, state), M.GPUFunctionMode(state), rec:
        model(x, x)
    return Trace(rec.ops, rec.peak_bytes)


def trace_train_step(mcfg, tcfg, fused: bool | None = None, amp: bool = True, compiled: bool = False) -> Trace:
    """One steady-state optimizer step of ``slm_utils.train_step`` at tcfg's micro-batch.

    With gradient accumulation two micro-batches are traced: the second stands for all the
    others (it also pays the additions into the existing gradients). ``fused`` is passed to
    ``configure_optimizer`` (None: its GPU default, fused AdamW); ``amp=False`` traces fp32
    without autocast (as on a CPU, which is how the memory timeline is checked in the tests).
    ``compiled=True`` traces the code torch.compile receives (``_compiled_form``): the one to price
    compiled. It differs only with the fused head + loss (``loss_chunk`` > 0).
    """
    import dataclasses

    M, S = _machinery(), _slm()
    torch = M.torch
    tcfg = dataclasses.replace(tcfg, muon_ns_dtype="bfloat16")  # "auto" would ask a CUDA device its capability
    model = _meta_model(mcfg).train()
    B, T = tcfg.batch_size, tcfg.block_size
    x = torch.zeros(B, T, dtype=torch.long, device="meta")
    batches = [(x, x)] * (1 if tcfg.grad_accum_steps == 1 else 2)
    with M.meta_acts_as_cuda():
        optimizer = S.configure_optimizer(model, tcfg, "cuda", fused=fused)
        scaler = torch.amp.GradScaler("cpu", enabled=False)  # bf16 needs none; a T4's fp16 scaler is priced apart
        for _ in range(2):  # the first step creates the optimizer state; the second is the one kept
            state = M.State(autocast=torch.bfloat16 if amp else None, tail_on_sync=True,
                            vocab_widths=(mcfg.vocab_size, mcfg.padded_vocab_size))
            rec = M.Recorder(state)
            with M.regions(model, state), M.GPUFunctionMode(state), rec, _compiled_form(compiled), \
                    torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
                S.train_step(model, M.PhaseOptimizer(optimizer, state), scaler, batches, grad_clip=tcfg.grad_clip,
                             device="meta", dtype=torch.float32, loss_chunk=tcfg.loss_chunk)
    opt_state = sum(t.untyped_storage().nbytes() for st in optimizer.state.values() for t in st.values()
                    if isinstance(t, torch.Tensor))
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    weights = sum(storages.values())
    grads = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    batch = 2 * x.numel() * x.element_size()
    n_tensors = len({id(p) for p in model.parameters()})
    return Trace(rec.ops, rec.peak_bytes, static=weights + opt_state + batch, saved=sum(rec.saved.values()),
                 weights=weights, grads=grads, optimizer_state=opt_state, checkpoint_bytes=weights + opt_state,
                 param_tensors=n_tensors, micro_batches=len(batches))


def trace_eval_batch(mcfg, tcfg, compiled: bool = False) -> Trace:
    """One batch of ``slm_utils.estimate_loss``: eval mode, no grad, autocast, the loss read back.
    ``compiled``: as in ``trace_train_step``."""
    M, S = _machinery(), _slm()
    torch = M.torch
    model = _meta_model(mcfg)
    x = torch.zeros(tcfg.eval_batch_size, tcfg.block_size, dtype=torch.long, device="meta")
    state = M.State(autocast=torch.bfloat16, force_autocast=True)
    rec = M.Recorder(state)
    with M.regions(model, state), M.GPUFunctionMode(state), rec, _compiled_form(compiled):
        S.estimate_loss(model, x, x, batch_size=tcfg.eval_batch_size, device="meta", dtype=torch.float32,
                        loss_chunk=tcfg.loss_chunk)
    return Trace(rec.ops, rec.peak_bytes)


def traces_by_mode(trace, mcfg, tcfg, **kwargs) -> dict[str, Trace]:
    """``trace`` (``trace_train_step`` or ``trace_eval_batch``) for each pricing mode: the eager code
    for "eager", the code torch.compile receives for "compiled" and "cuda_graphs" (one trace for all
    three when they are the same code, as without the fused head + loss)."""
    eager = trace(mcfg, tcfg, **kwargs)
    compiled = trace(mcfg, tcfg, compiled=True, **kwargs) if tcfg.loss_chunk else eager
    return {"eager": eager, "compiled": compiled, "cuda_graphs": compiled}


def trace_decode_step(mcfg, cache_len: int | None = None) -> Trace:
    """One cached greedy step of ``GPT.generate_stream`` at batch 1, in fp32 as generate runs it."""
    M, S = _machinery(), _slm()
    torch = M.torch
    model = _meta_model(mcfg).eval()
    L = mcfg.block_size // 2 if cache_len is None else cache_len
    cache = S.KVCache(mcfg, 1, "meta", torch.float32)
    cache.length = L  # as if the prompt and the tokens so far were in it (meta: no values needed)
    seq = torch.zeros(1, L + 1, dtype=torch.long, device="meta")
    state = M.State(autocast=None)
    rec = M.Recorder(state)
    with torch.no_grad(), M.regions(model, state), M.GPUFunctionMode(state), rec:
        logits, _ = model(seq[:, -1:], cache=cache, last_only=True)
        nxt = S.sample_next(logits[:, -1, :], temperature=0.0)
        torch.cat([seq, nxt], dim=1)
        nxt.squeeze(1)
    return Trace(rec.ops, rec.peak_bytes, cache_len=L)


# =====================================================================================
# Pricing the traced ops on a chip
# =====================================================================================


def _gpu_seconds(op: Op, chip: dict) -> float:
    """Roofline time of one kernel on the chip, without launch overhead."""
    memory = op.bytes / (chip["bandwidth_gbs"] * 1e9 * chip["bandwidth_efficiency"])
    if not op.flops:
        return memory
    peak = (chip["tensor_tflops"] if op.tensor_core else chip["fp32_tflops"]) * 1e12 * chip["matmul_efficiency"]
    units = op.tiles
    if units < chip["sms"] and op.kind == "matmul":  # split-K: few output tiles, long K (weight gradients)
        units *= max(1, min(math.ceil(chip["sms"] / units), op.k // _a("split_k_min")))
    waves = math.ceil(units / chip["sms"])
    peak *= units / (waves * chip["sms"])  # the last wave runs part-empty
    if op.misaligned and op.tensor_core:
        peak *= _a("misaligned_factor")
    return max(op.flops / peak, memory)


# What a step's GPU time is spent on (``price``'s ``tally``): where MFU is lost when launches cost nothing
GPU_TIME_KINDS = ("matmul", "attention", "logits", "other", "optimizer", "tail")


def _time_kind(op: Op) -> str:
    """The GPU_TIME_KINDS entry of an op: the optimizer and the step's tail (clipping, the loss's
    .item(), GradScaler) by region; in the forward, the backward and between micro-batches, matmuls
    and attention by kind; every other kernel that works on logits (a tensor as wide as the
    vocabulary: the softmax, the loss, their gradients, the logits' casts and slices) as 'logits';
    the rest (elementwise work, norms, the embedding) as 'other'. A model whose hidden width equals
    its vocabulary would have its activations counted as logits."""
    if op.region in ("optimizer", "tail"):
        return op.region
    if op.kind in ("matmul", "attention"):
        return op.kind
    return "logits" if op.logits else "other"


def _eager(ops: list[Op], chip: dict, tally: dict | None = None) -> tuple[float, float, int]:
    """(GPU seconds, CPU overhead seconds, kernels) of ops run eagerly; ``tally`` (if given) adds each
    op's GPU seconds under its ``_time_kind``."""
    gpu = cpu = 0.0
    kernels = 0
    for op in ops:
        if op.kind in ("view", "alloc"):
            cpu += _a("eager_view_us") * 1e-6
            continue
        seconds = _gpu_seconds(op, chip)
        gpu += seconds
        if tally is not None:
            tally[_time_kind(op)] = tally.get(_time_kind(op), 0.0) + seconds
        cpu += (_a("eager_op_us") + _a("eager_extra_launch_us") * (op.launches - 1)) * 1e-6
        if op.kind == "sync":
            cpu += _a("sync_us") * 1e-6
        kernels += op.launches
    return gpu, cpu, kernels


def _same_space(a: int, b: int) -> bool:
    """Two loops Inductor runs as one: the same number of elements, or within 1% (a padded width)."""
    return abs(a - b) <= 0.01 * max(a, b)


def _has_own_work(ops: list[Op]) -> bool:
    """Whether a loop does work beside its reductions over rows: pointwise ops (other than a cast of
    those reductions' totals, which runs at the end of their kernel) or a row reduction."""
    totals = [r.outputs for op in ops for r in op.reductions or () if not r.inner]
    return any(r.inner for op in ops for r in op.reductions or ()) or any(
        not op.reductions and not any(_same_space(op.space or 0, n) for n in totals) for op in ops)


def _space_kernels(ops: list[Op], sms: int) -> int:
    """Kernels of the ops of one space (ASSUMPTIONS['compiled_fusion']): row reductions share the
    space's kernel, one more for each further one; a reduction over rows is a kernel of its own, and
    is split in two (partial sums per block of rows, then their total) when it leaves too few outputs
    to fill the GPU; a row reduction too, when it leaves fewer than 2 per SM and is long."""
    inner = outer = 0
    for op in ops:
        for r in op.reductions or ():
            if r.inner:
                inner += 2 if r.outputs < 2 * sms and r.length > _a("split_row_reduction_min") else 1
            elif r.outputs < _a("split_outputs_per_sm") * sms and r.length > _MIN_SPLIT_LENGTH:
                outer += 1 + r.count  # the partial sums of all of them in one kernel, then each total
            else:
                outer += 1
    return (max(1, inner) if _has_own_work(ops) or not outer else 0) + outer


def _loops_of_run(run: list[Op], trace: Trace) -> list[list[Op]]:
    """The ops of a run between two library kernels, by the loop Inductor fuses them into: one per
    loop size, in order of appearance, less the loops it computes inside another."""
    end = run[-1].index
    loops: list[list[Op]] = []
    for op in run:
        for loop in loops:
            if _same_space(loop[0].space or 0, op.space or 0):
                loop.append(op)
                break
        else:
            loops.append([op])
    merged = True
    while merged:
        merged = False
        for g in loops:
            if any(op.reductions for op in g):
                continue
            out = {uid for op in g for uid in op.writes}
            reader = None
            if all(trace.last_read.get(uid, -1) <= end for uid in out):
                # results only other loops of the run read: computed inside the first of them
                reader = next((h for h in loops if h is not g and any(uid in op.reads for op in h for uid in out)),
                              None)
            if reader is None:
                # a loop over a reduction's totals that reads them (a bias gradient's cast): run at the
                # end of the reduction's kernel
                reads = {uid for op in g for uid in op.reads}
                reader = next((h for h in loops if h is not g and any(
                    _same_space(r.outputs, g[0].space or 0) and not r.inner and reads & set(op.writes)
                    for op in h for r in op.reductions or ())), None)
            if reader is not None:
                reader.extend(g)
                reader.sort(key=lambda op: op.index)
                loops.remove(g)
                merged = True
                break
    return loops


def _loop_bytes(loop: list[Op], trace: Trace, end: int, read_elsewhere: set[int]) -> int:
    """Bytes one fused loop moves: each tensor it did not produce, read once; each result something
    later reads (after the run, in another loop of it, or in place outside it), written once."""
    produced: set[int] = set()  # storages written inside the loop so far
    external: dict = {}  # storages read from outside: once each
    written: dict[int, int] = {}
    dropped: set[int] = set()
    # a result computed out of place, through any chain of the loop's ops, from what the loop read
    # from memory: those reads (recomputing it means reading them again). A tensor changed in place
    # has none: its reads alone do not make it
    source: dict[int, dict[int, int]] = {}
    for op in loop:
        for uid, b in op.reads.items():
            if uid not in produced:
                external[uid] = max(external.get(uid, 0), b)
        for uid, b in op.writes.items():
            produced.add(uid)
            written[uid] = max(written.get(uid, 0), b)
        if op.name == "_log_softmax" and op.region == "forward":
            # the backward recomputes the log-probabilities from the logits it keeps: not stored;
            # the loss reads what they were made from (the logits) a second time
            dropped.update(op.writes)
            for uid in op.reads:
                for src, b in source.get(uid, {uid: op.reads[uid]}).items():
                    external[("again", src)] = b
        if op.reads.keys() & op.writes.keys():
            for uid in op.writes:
                source.pop(uid, None)
        elif all(u not in produced or u in source for u in op.reads):
            made_from = {}
            for u, b in op.reads.items():
                made_from.update(source.get(u, {u: b}))
            for uid in op.writes:
                source[uid] = made_from
        else:  # made from a result the loop cannot recompute from memory
            for uid in op.writes:
                source.pop(uid, None)
    stored = sum(b for uid, b in written.items() if uid not in dropped and (
        trace.last_read.get(uid, -1) > end or uid in external or uid in read_elsewhere))
    # a reduction over rows beside the loop's own work is a kernel of its own, which reads its inputs
    # again (a norm's backward: the gradient and the input, for the weight's gradient)
    again = 0
    if _has_own_work(loop):
        again = sum(sum(op.reads.values()) for op in loop if any(not r.inner for r in op.reductions or ()))
    return sum(external.values()) + stored + again


def _fused_groups(ops: list[Op], trace: Trace, sms: int) -> list[dict]:
    """Inductor's fusion, as ASSUMPTIONS['compiled_fusion'] states it, over one compiled region: the
    library kernels ({"op": ...}) and the fused loops ({"bytes", "kernels"}) in order."""
    items, run = [], []

    def close():
        if not run:
            return
        loops = _loops_of_run(run, trace)
        reads_of = [{uid for op in loop for uid in op.reads} for loop in loops]
        for i, loop in enumerate(loops):
            elsewhere = set().union(*(r for j, r in enumerate(reads_of) if j != i))
            items.append({"bytes": _loop_bytes(loop, trace, run[-1].index, elsewhere),
                          "kernels": _space_kernels(loop, sms), "logits": any(op.logits for op in loop)})
        run.clear()

    for op in ops:
        if op.kind in ("view", "alloc"):
            continue  # metadata only, inside a graph
        if op.kind in ("matmul", "attention", "sync", "multi"):
            close()
            items.append({"op": op})
        else:
            run.append(op)
    close()
    return items


# Inductor scheduler nodes that launch no generated kernel (bench/inductor_groups.py records them):
# calls into a library (cuBLAS, flash attention), nodes that only alias a buffer, and the outputs of a
# library call that returns several tensors
INDUCTOR_NOT_GENERATED = ("ExternKernelSchedulerNode", "NopKernelSchedulerNode", "MultiOutput")


def _compiled(ops: list[Op], chip: dict, trace: Trace, nodes: list[dict] | None = None,
              tally: dict | None = None) -> tuple[float, float, int]:
    """(GPU seconds, CPU overhead seconds, kernels) of one compiled region (a forward or a backward).
    ``nodes``: Inductor's own scheduler nodes for this region (``bench/inductor_groups.py``), priced in
    place of the fused groups of ASSUMPTIONS['compiled_fusion']; matmuls and attention stay the traced ops.
    ``tally``: as in ``_eager``; a fused group counts as 'logits' when any op of its loop does, and
    Inductor's own nodes (which carry no shapes) all as 'other'."""
    gpu, cpu, kernels = 0.0, _a("compiled_graph_call_us") * 1e-6, 0
    tally = {} if tally is None else tally
    bandwidth = chip["bandwidth_gbs"] * 1e9 * chip["bandwidth_efficiency"]
    for item in _fused_groups(ops, trace, chip["sms"]):
        if "op" in item:
            op = item["op"]
            seconds, kind = _gpu_seconds(op, chip), _time_kind(op)
            n = op.launches
        elif nodes is not None:
            continue
        else:
            seconds, kind = item["bytes"] / bandwidth, "logits" if item["logits"] else "other"
            n = item["kernels"]
        gpu += seconds
        tally[kind] = tally.get(kind, 0.0) + seconds
        cpu += _a("compiled_kernel_us") * 1e-6 * n
        kernels += n
    if nodes is not None:
        generated = [n for n in nodes if n["kind"] not in INDUCTOR_NOT_GENERATED]
        seconds = sum(n["bytes"] for n in generated) / bandwidth
        gpu += seconds
        tally["other"] = tally.get("other", 0.0) + seconds
        cpu += _a("compiled_kernel_us") * 1e-6 * len(generated)
        kernels += len(generated)
    return gpu, cpu, kernels


def price(trace: Trace, chip: dict, mode: str, micro: int | None = None, regions=None,
          inductor: dict | None = None, tally: dict | None = None) -> dict:
    """GPU time, CPU overhead and kernels of (part of) a trace: forward and backward compiled in
    'compiled' mode, and also replayed from CUDA graphs in 'cuda_graphs' mode; everything else eager.
    ``inductor``: Inductor's nodes per region ({"forward": [...], "backward": [...]}, the same for every
    micro-batch: one compiled graph serves them all). ``tally`` (if given) adds the GPU seconds by
    GPU_TIME_KINDS."""
    ops = trace.select(regions, micro)
    gpu = cpu = 0.0
    kernels = 0
    if mode not in ("eager", "compiled", "cuda_graphs"):
        raise ValueError(f"mode={mode!r}: 'eager', 'compiled' or 'cuda_graphs'")
    if mode != "eager":
        for region in ("forward", "backward"):
            for m in sorted({op.micro for op in ops if op.region == region}):
                part = [op for op in ops if op.region == region and op.micro == m]
                g, c, k = _compiled(part, chip, trace, (inductor or {}).get(region), tally)
                if mode == "cuda_graphs":  # one replay instead of a launch per kernel
                    c = (_a("compiled_graph_call_us") + _a("cudagraph_replay_us")) * 1e-6
                gpu, cpu, kernels = gpu + g, cpu + c, kernels + k
        ops = [op for op in ops if op.region not in ("forward", "backward")]
    g, c, k = _eager(ops, chip, tally)
    return {"gpu_s": gpu + g, "cpu_s": cpu + c, "kernels": kernels + k}


def _scaler_ops(trace: Trace) -> list[Op]:
    """A T4's fp16 GradScaler, per step: unscale every gradient (read + write), update, one sync."""
    grads = trace.info["grads"]
    n = trace.info["param_tensors"]
    launches = max(math.ceil(n / _MAX_TENSORS_PER_LAUNCH[0]), math.ceil(grads / 4 / _CHUNK / _MAX_BLOCKS))
    common = dict(region="tail", micro=0, flops=0.0, tensor_core=False, misaligned=False, tiles=1, k=1, reduction=False,
                  reads={}, writes={})
    return [Op(index=-1, name="_amp_foreach_non_finite_check_and_unscale_", kind="multi", read=grads, write=grads,
               launches=launches, **common),
            Op(index=-1, name="_amp_update_scale_", kind="kernel", read=16, write=8, launches=1, **common),
            Op(index=-1, name="_local_scalar_dense", kind="sync", read=4, write=0, launches=1, **common)]


def step_cost(trace: Trace, tcfg, chip: dict, mode: str, inductor: dict | None = None) -> dict:
    """Seconds of one optimizer step: micro-batch 0, the others like micro-batch 1, the tail, the host.
    ``inductor``: see ``price``; for a step of one micro-batch only (see ``inductor_nodes_for``)."""
    A = tcfg.grad_accum_steps
    if mode == "cuda_graphs" and A != 1:
        raise ValueError(f"CUDA graphs take one micro-batch per step (TrainConfig.cuda_graphs), not {A}.")
    if inductor is not None and A != 1:
        raise ValueError(f"Inductor's nodes price a step of one micro-batch, not {A}: the later ones add their "
                         "gradients outside the compiled graph, which the nodes do not hold.")
    micro_regions = ("forward", "backward", "glue")
    by_kind = dict.fromkeys(GPU_TIME_KINDS, 0.0)
    parts = [price(trace, chip, mode, 0, micro_regions, inductor, by_kind)]
    if A > 1:
        later = dict.fromkeys(GPU_TIME_KINDS, 0.0)
        other = price(trace, chip, mode, 1, micro_regions, inductor, later)
        parts.append({k: v * (A - 1) for k, v in other.items()})
        for kind, seconds in later.items():
            by_kind[kind] += seconds * (A - 1)
    parts.append(price(trace, chip, mode, None, ("tail", "optimizer"), tally=by_kind))
    if chip["amp"] == "float16":
        parts.append(dict(zip(("gpu_s", "cpu_s", "kernels"), _eager(_scaler_ops(trace), chip, by_kind))))
    gpu = sum(p["gpu_s"] for p in parts)
    cpu = sum(p["cpu_s"] for p in parts)
    fixed, per_window = _a("host_batch_ms")
    host = (A * (fixed + per_window * tcfg.batch_size) + _a("host_step_ms")) / 1e3
    return {"step_s": gpu + cpu + host, "overlapped_s": max(gpu, cpu) + host, "gpu_s": gpu, "cpu_s": cpu,
            "host_s": host, "kernels": sum(p["kernels"] for p in parts), "gpu_by_kind": by_kind}


def peak_memory(trace: Trace) -> dict:
    """Peak device memory of a training step, eager (ASSUMPTIONS['memory'])."""
    raw = trace.static + trace.peak_live
    return {"weights_gib": trace.info["weights"] / 2**30, "optimizer_gib": trace.info["optimizer_state"] / 2**30,
            "saved_activations_gib": trace.saved / 2**30, "traced_peak_gib": trace.peak_live / 2**30,
            "peak_gib": raw * _a("memory_slack") / 2**30 + _a("cuda_context_gib")}


def fits(peak_gib: float, chip: dict) -> bool:
    return peak_gib <= chip["usable_gib"]


# =====================================================================================
# Putting it together: presets, the micro-batch sweep, the check against the H100 figures
# =====================================================================================


def _seconds(parts: dict, factors: tuple[float, float] | None) -> float:
    """Step (or batch) seconds from its parts; ``factors`` = (GPU, CPU overhead) calibration."""
    g, c = factors or (1.0, 1.0)
    return g * parts["gpu_s"] + c * parts["cpu_s"] + parts.get("host_s", 0.0)


def _figures(step: dict, ev: dict, dec: dict, tcfg, info: dict, chip: dict, ckpt: dict, n_evals: int,
             eval_batches: int, factors) -> dict:
    """tok/s, MFU and the full run's times for one chip and mode, raw or calibrated."""
    step_s, eval_batch_s, decode_s = _seconds(step, factors), _seconds(ev, factors), _seconds(dec, factors)
    tok_s = tcfg.tokens_per_step / step_s
    e = {"tok_s": tok_s, "mfu": info["model_flops_per_token"] * tok_s / (chip["tensor_tflops"] * 1e12),
         "step_ms": step_s * 1e3, "train_s": step_s * tcfg.max_steps, "eval_batch_ms": eval_batch_s * 1e3,
         "eval_tok_s": tcfg.eval_batch_size * tcfg.block_size / eval_batch_s,
         "eval_s": eval_batch_s * eval_batches * n_evals,
         "decode_tok_s": 1.0 / decode_s}
    for where, key in (("local", "ckpt_s"), ("drive", "ckpt_s_drive")):
        c = ckpt[where]
        last_writes = n_evals  # at every evaluation, or on the timer and at the end
        if c["last_every_s"] > 0:
            last_writes = min(n_evals, 1 + int((e["train_s"] + e["eval_s"]) // c["last_every_s"]))
        e[key] = n_evals * c["best"] + last_writes * c["last"]
        if c["background"]:  # training waits for the copies, and for writing only past the next evaluation
            between = (e["train_s"] + e["eval_s"]) / n_evals
            writing = e[key]
            e[key] = n_evals * c["copy_best"] + last_writes * c["copy_last"] + max(0.0, writing - between * n_evals)
        e[key + "_per_eval"] = e[key] / n_evals
    e["total_s"] = e["train_s"] + e["eval_s"] + e["ckpt_s"]
    e["total_s_drive"] = e["train_s"] + e["eval_s"] + e["ckpt_s_drive"]
    return e


def project_preset(name: str, chips: list[str], factors: tuple[float, float] | None = None,
                   overrides: dict | None = None) -> dict:
    """Trace a preset (once per form of its code), price it on every chip, eager and compiled; with
    ``factors``, also calibrated."""
    S = _slm()
    mcfg, tcfg = S.preset(name, **(overrides or {}))
    trains, evaluations = traces_by_mode(trace_train_step, mcfg, tcfg), traces_by_mode(trace_eval_batch, mcfg, tcfg)
    # FLOPs and checkpoint bytes are the same in both forms; peak memory is the eager one's
    # (ASSUMPTIONS['memory']): Inductor keeps none of the out-of-place chunk's temporaries
    train = trains["eager"]
    decode = trace_decode_step(mcfg)
    info = model_info(mcfg, tcfg.block_size)
    tokens = tcfg.tokens_per_step
    n_evals = _evaluations(tcfg.max_steps, tcfg.eval_interval)
    eval_batches = math.ceil((tcfg.eval_tokens // tcfg.block_size) / tcfg.eval_batch_size)
    size = train.info["checkpoint_bytes"]
    weights = sum(p.numel() * 4 for p in _meta_model(mcfg).parameters())  # fp32; a tied matrix counts once
    best_size = weights if tcfg.best_weights_only else size

    def file_s(nbytes: int, gbs: float) -> float:  # serialize, hash, write with fsync (ASSUMPTIONS['checkpoint'])
        return nbytes / (_a("serialize_gbs") * 1e9) + nbytes / (_a("hash_gbs") * 1e9) + nbytes / (gbs * 1e9)

    ckpt = {where: {"best": file_s(best_size, gbs), "last": file_s(size, gbs), "last_every_s": tcfg.last_every_s,
                    "background": tcfg.background_checkpoints,
                    "copy_best": best_size / (_a("snapshot_gbs") * 1e9), "copy_last": size / (_a("snapshot_gbs") * 1e9)}
            for where, gbs in _a("write_gbs").items()}
    memory = peak_memory(train)
    micro_tokens = tcfg.batch_size * tcfg.block_size
    traced_flops = (train.flops(("forward", "backward"), 0) / micro_tokens
                    + train.flops(("optimizer", "tail")) / tokens)
    run = {"max_steps": tcfg.max_steps, "eval_interval": tcfg.eval_interval, "eval_tokens": tcfg.eval_tokens,
           "block_size": tcfg.block_size, "eval_batch_size": tcfg.eval_batch_size, "evaluations": n_evals,
           "eval_batches": eval_batches, "batch_size": tcfg.batch_size, "grad_accum_steps": tcfg.grad_accum_steps,
           "tokens_per_step": tokens, "optimizer": tcfg.optimizer, "arch": mcfg.arch,
           "pad_vocab_multiple": mcfg.pad_vocab_multiple, "shape": f"{mcfg.n_layer}/{mcfg.n_head}/{mcfg.n_embd}",
           **info, "traced_flops_per_token": traced_flops, "checkpoint_mb": size / 1e6, **memory,
           "traced_ops_per_step": len(train.ops), "decode_cache_len": decode.info["cache_len"]}
    per_chip = {}
    for chip_name in chips:
        chip = CHIPS[chip_name]
        dec = price(decode, chip, "eager")  # generate never runs the compiled model
        per_chip[chip_name] = {}
        for mode in ("eager", "compiled"):
            step = step_cost(trains[mode], tcfg, chip, mode)
            ev = price(evaluations[mode], chip, mode)
            e = _figures(step, ev, dec, tcfg, info, chip, ckpt, n_evals, eval_batches, None)
            e.update({"tok_s_overlapped": tokens / step["overlapped_s"], "gpu_ms": step["gpu_s"] * 1e3,
                      "overhead_ms": step["cpu_s"] * 1e3, "host_ms": step["host_s"] * 1e3,
                      "kernels_per_step": step["kernels"], "peak_gib": memory["peak_gib"],
                      "fits": fits(memory["peak_gib"], chip)})
            if factors:
                e["calibrated"] = _figures(step, ev, dec, tcfg, info, chip, ckpt, n_evals, eval_batches, factors)
            per_chip[chip_name][mode] = e
    return {"run": run, "chips": per_chip}


def _variant_row(mcfg, tcfg, chips: list[str], factors: tuple[float, float] | None) -> dict:
    """One traced variant of a preset's step: its micro-batch, peak memory, FLOPs, and training tok/s
    on each chip, eager and compiled (and calibrated, with factors)."""
    traces = traces_by_mode(trace_train_step, mcfg, tcfg)
    trace = traces["eager"]
    rates = {}
    for c in chips:
        rates[c] = {}
        for mode in ("eager", "compiled"):
            step = step_cost(traces[mode], tcfg, CHIPS[c], mode)
            rates[c][mode] = tcfg.tokens_per_step / _seconds(step, None)
            rates[c][mode + "_kernels"] = step["kernels"]
            if factors:
                rates[c][mode + "_calibrated"] = tcfg.tokens_per_step / _seconds(step, factors)
    return {"batch_size": tcfg.batch_size, "grad_accum_steps": tcfg.grad_accum_steps, **peak_memory(trace),
            "flops": trace.flops(), "tok_s": rates}


def micro_batch_sweep(name: str, batches: list[int], chips: list[str],
                      factors: tuple[float, float] | None = None) -> dict:
    """The preset at other micro-batch sizes, tokens per optimizer step held fixed."""
    import dataclasses

    S = _slm()
    mcfg, tcfg = S.preset(name)
    windows = tcfg.batch_size * tcfg.grad_accum_steps
    rows = []
    for B in batches:
        if windows % B:
            continue
        row = _variant_row(mcfg, dataclasses.replace(tcfg, batch_size=B, grad_accum_steps=windows // B),
                           chips, factors)
        rows.append({**row, "fits": {c: fits(row["peak_gib"], CHIPS[c]) for c in chips}})
    return {"preset": name, "windows_per_step": windows, "tokens_per_step": windows * tcfg.block_size, "rows": rows}


def lever_rows(name: str, batches: list[int], field: str, values: list, chips: list[str],
               factors: tuple[float, float] | None = None) -> dict:
    """The preset with the TrainConfig ``field`` at each of ``values``, at each micro-batch size
    (tokens per optimizer step fixed): traced peak memory and tok/s, one row per pair."""
    import dataclasses

    S = _slm()
    mcfg, tcfg = S.preset(name)
    windows = tcfg.batch_size * tcfg.grad_accum_steps
    rows = []
    for B in batches:
        for value in values:
            cfg = dataclasses.replace(tcfg, batch_size=B, grad_accum_steps=windows // B, **{field: value})
            rows.append({**_variant_row(mcfg, cfg, chips, factors), field: value})
    return {"preset": name, "field": field, "rows": rows}


def fused_loss_levers(name: str, batches: list[int], chunks: list[int], chips: list[str],
                      factors: tuple[float, float] | None = None) -> dict:
    """The preset with the plain head + loss (chunk 0) and the fused one at each chunk size."""
    return lever_rows(name, batches, "loss_chunk", chunks, chips, factors)


def muon_stack_levers(name: str, batches: list[int], chips: list[str],
                      factors: tuple[float, float] | None = None) -> dict:
    """The preset's Muon one matrix at a time ("off") and stacked by shape ("on", a GPU's default)."""
    return lever_rows(name, batches, "muon_stack", ["off", "on"], chips, factors)


def mfu_ceiling(name: str, batches: list[int], chips: list[str], factors: tuple[float, float] | None = None,
                loss_chunk: int = 4096) -> dict:
    """How far MFU can go at a preset's model shape: one micro-batch of B windows per optimizer step,
    compiled, Muon stacked, the head + loss fused in ``loss_chunk`` rows. Per chip: the step's MFU as
    projected; with the forward and backward replayed from CUDA graphs (``TrainConfig.cuda_graphs``;
    the optimizer stays eager); of the GPU's own time alone, with no launch overhead and no host work
    (the bound that CUDA graphs over the whole step, with the batches prepared ahead, could reach at
    best); and that GPU time split by GPU_TIME_KINDS. A batch other than the preset's changes its
    recipe; this asks only what the hardware allows at the shape."""
    import dataclasses

    S = _slm()
    mcfg, tcfg = S.preset(name)
    flops_per_token = model_info(mcfg, tcfg.block_size)["model_flops_per_token"]
    rows = []
    for B in batches:
        cfg = dataclasses.replace(tcfg, batch_size=B, grad_accum_steps=1, loss_chunk=loss_chunk, muon_stack="on")
        traces = traces_by_mode(trace_train_step, mcfg, cfg)
        trace = traces["compiled"]
        flops = flops_per_token * cfg.tokens_per_step
        per_chip = {}
        for c in chips:
            peak = CHIPS[c]["tensor_tflops"] * 1e12
            step = step_cost(trace, cfg, CHIPS[c], "compiled")
            graphs = step_cost(trace, cfg, CHIPS[c], "cuda_graphs")
            e = {"step_ms": step["step_s"] * 1e3, "gpu_ms": step["gpu_s"] * 1e3, "mfu": flops / step["step_s"] / peak,
                 "cuda_graphs_mfu": flops / graphs["step_s"] / peak, "gpu_only_mfu": flops / step["gpu_s"] / peak,
                 "gpu_share": {k: v / step["gpu_s"] for k, v in step["gpu_by_kind"].items()}}
            if factors:  # the GPU factor alone: no launch overhead is left to scale
                e["mfu_calibrated"] = flops / _seconds(step, factors) / peak
                e["cuda_graphs_mfu_calibrated"] = flops / _seconds(graphs, factors) / peak
                e["gpu_only_mfu_calibrated"] = e["gpu_only_mfu"] / factors[0]
            per_chip[c] = e
        rows.append({"batch_size": B, "tokens_per_step": cfg.tokens_per_step,
                     "peak_gib": peak_memory(traces["eager"])["peak_gib"],
                     "chips": per_chip})
    return {"preset": name, "loss_chunk": loss_chunk, "rows": rows}


# What BENCHMARKS.md recorded on an H100 80GB HBM3 (sections 2 and 5, 2026-11-26, two runs each).
MEASURED_H100 = {
    "shape": "GPT-2 blocks 6/6/384, vocabulary 50,257 padded to 50,304, dropout 0.1, batch 64 x 128, "
             "AdamW (configure_optimizer defaults), grad_clip 1.0, bf16 autocast, one micro-batch per step",
    "train_eager": (340_382, 347_377),
    "train_compiled": (513_441, 568_082),
    "train_eager_pad1": (278_275, 290_997),
    "train_eager_foreach_adamw": (261_110, 273_382),
    "eval_forward_eager": (1_094_954,),
    "decode_cached_greedy": (256 / 0.56, 256 / 0.47),
    "source": "BENCHMARKS.md section 2 ('GPU figures, with each lever', runs 2 and 1), its evaluation paragraph "
              "(forward-only 1,094,954 tok/s, run 2), and section 5 ('KV cache on the GPU': 256 greedy tokens at "
              "batch 1 in 0.56 s and, in the first attempt, 0.47 s with the cache, the old GPT-2 't4' preset, "
              "dropout 0; those times include the prompt's prefill and two window hops)",
}
# Which figures fit the two calibration factors; the other four check them.
CALIBRATION_FIT = {"cpu": "decode_cached_greedy", "gpu": "train_eager"}


def h100_checks() -> list[dict]:
    """The H100 lever-table shape priced with the same machinery: the parts of each predicted time."""
    S = _slm()
    chip = CHIPS["H100"]
    shape = dict(vocab_size=50257, block_size=128, n_layer=6, n_head=6, n_embd=384, dropout=0.1, bias=True)
    tcfg = S.TrainConfig(batch_size=64, block_size=128, max_steps=10_000, eval_batch_size=64)
    tokens = tcfg.tokens_per_step
    checks = []

    def add(what, units, parts, note=""):
        checks.append({"what": what, "measured": list(MEASURED_H100[what]), "units": units,
                       "gpu_s": parts["gpu_s"], "cpu_s": parts["cpu_s"], "host_s": parts.get("host_s", 0.0),
                       "note": note})

    mcfg = S.GPTConfig(**shape, pad_vocab_multiple=64)
    trace = trace_train_step(mcfg, tcfg)
    for mode in ("eager", "compiled"):
        add(f"train_{mode}", tokens, step_cost(trace, tcfg, chip, mode))
        # the same shape on a T4, beside BENCHMARKS.md's "derived T4 estimate" (H100 tok/s x 65/989)
        checks[-1]["t4"] = step_cost(trace, tcfg, CHIPS["T4"], mode)
    add("train_eager_pad1", tokens, step_cost(trace_train_step(S.GPTConfig(**shape), tcfg), tcfg, chip, "eager"))
    add("train_eager_foreach_adamw", tokens,
        step_cost(trace_train_step(mcfg, tcfg, fused=False), tcfg, chip, "eager"))
    add("eval_forward_eager", tcfg.eval_batch_size * tcfg.block_size,
        price(trace_eval_batch(mcfg, tcfg), chip, "eager"))
    add("decode_cached_greedy", 1, price(trace_decode_step(S.GPTConfig(**{**shape, "dropout": 0.0},
                                                                     pad_vocab_multiple=64)), chip, "eager"),
        "measured: 256 tokens including the prefill and two window hops; projected: the steady cached step")
    return checks


def inductor_nodes_for(records: list[dict], mcfg, tcfg, dtype: str, chip_name: str) -> tuple[dict | None, str]:
    """Inductor's nodes per region ({"forward": [...], "backward": [...]}) from the record of
    ``bench/inductor_groups.py`` that compiled this model at this micro-batch, loss chunk and autocast
    dtype for this chip, and a note; (None, "") when none did. Dropout may differ, with a note: a CPU
    build takes attention's math path under dropout, so the stand-in lowers the model without it. An
    exact match wins; two equally good ones are refused, since they may be different code. Only a
    step of one micro-batch: later micro-batches add their gradients outside the compiled graph,
    which the records do not hold."""
    import dataclasses

    if tcfg.grad_accum_steps != 1:
        return None, ""
    want = dataclasses.asdict(mcfg)
    same = lambda have: {k: v for k, v in have.items() if k != "dropout"} == {  # noqa: E731
        k: v for k, v in want.items() if k != "dropout"}
    found = [r for r in records if same(r["model_config"])
             and (r["micro_batch"], r["block_size"], r["loss_chunk"], r["chip"])
             == (tcfg.batch_size, tcfg.block_size, tcfg.loss_chunk, chip_name)
             and r.get("dtype", r.get("overrides", {}).get("dtype")) == dtype]  # older records: in overrides
    exact = [r for r in found if r["model_config"]["dropout"] == want["dropout"]]
    best = exact or found
    if len(best) > 1:
        raise SystemExit(f"{len(best)} records of bench/inductor_groups.py match the same figure "
                         f"({tcfg.batch_size} windows, loss chunk {tcfg.loss_chunk}, {chip_name}): pass one.")
    if not best:
        return None, ""
    r = best[0]
    note = "" if exact else (f"Inductor's kernels of the model at dropout {r['model_config']['dropout']}, "
                             f"not {want['dropout']}")
    return {g["region"]: g["nodes"] for g in r["graphs"]}, note


def gpu_run_checks(run_dir: str | Path, inductor: list[dict] = ()) -> dict:
    """The figures of a recorded ``bench/gpu_check.sh`` run (``bench/gpu_runs/<date>-<gpu>``), each beside
    its projection on that GPU: the lever table's GPT-2 shape (``train.json``), the ``"t4"`` preset's
    micro-batch sweep (``microbatch.json``) and its cached decoding (``decode.json``, the plain cache).
    ``inductor``: records of ``bench/inductor_groups.py``; each compiled figure whose model, micro-batch
    and chip one of them compiled is priced a second time with Inductor's own kernels in place of the
    fused groups (a row of its own, ", Inductor's kernels")."""
    import dataclasses
    import json

    S = _slm()
    run_dir = Path(run_dir)
    load = lambda name: json.loads((run_dir / name).read_text())  # noqa: E731
    train, sweep, decode = load("train.json"), load("microbatch.json"), load("decode.json")
    gpu = train["machine"]["device"]["name"]
    chip_name = chip_for_device_name(gpu)
    if chip_name is None:
        raise SystemExit(f"{run_dir}: the run's GPU, {gpu!r}, is not among the chips of this projection.")
    chip = CHIPS[chip_name]
    checks = []

    def add(what, measured, units, parts, note=""):
        checks.append({"what": what, "measured": [measured], "units": units, "gpu_s": parts["gpu_s"],
                       "cpu_s": parts["cpu_s"], "host_s": parts.get("host_s", 0.0), "note": note})

    def add_compiled(what, measured, trace, mcfg, tcfg, mode="compiled"):
        """A compiled figure (``mode``: 'compiled' or 'cuda_graphs'), and again with Inductor's own
        kernels when a record has them."""
        add(what, measured, tcfg.tokens_per_step, step_cost(trace, tcfg, chip, mode))
        nodes, note = inductor_nodes_for(inductor, mcfg, tcfg, chip["amp"], chip_name)
        if nodes is not None:
            add(what + ", Inductor's kernels", measured, tcfg.tokens_per_step,
                step_cost(trace, tcfg, chip, mode, nodes), note)

    # the lever table: GPT-2 blocks 6/6/384, one micro-batch of 64 x 128, AdamW, bf16 (as h100_checks)
    rate = {r["name"].split(" = ")[0]: r["tokens_per_s"] for r in train["rows"]}
    shape = dict(vocab_size=50257, block_size=128, n_layer=6, n_head=6, n_embd=384, dropout=0.1, bias=True)
    tcfg = S.TrainConfig(batch_size=64, block_size=128, max_steps=10_000, eval_batch_size=64)
    mcfg = S.GPTConfig(**shape, pad_vocab_multiple=64)
    trace = trace_train_step(mcfg, tcfg)
    tokens = tcfg.tokens_per_step
    add("GPT-2 shape, 64 x 1, eager", rate["slm_utils"], tokens, step_cost(trace, tcfg, chip, "eager"))
    add_compiled("GPT-2 shape, 64 x 1, compiled", rate["torch.compile on"], trace, mcfg, tcfg)
    if "torch.compile + CUDA graphs on" in rate:  # runs since 2026-11-30
        add_compiled("GPT-2 shape, 64 x 1, compiled, CUDA graphs", rate["torch.compile + CUDA graphs on"], trace,
                     mcfg, tcfg, "cuda_graphs")
    add("GPT-2 shape, 64 x 1, eager, vocabulary not padded", rate["pad 64 off"], tokens,
        step_cost(trace_train_step(S.GPTConfig(**shape), tcfg), tcfg, chip, "eager"))
    add("GPT-2 shape, 64 x 1, eager, AdamW not fused", rate["fused AdamW off"], tokens,
        step_cost(trace_train_step(mcfg, tcfg, fused=False), tcfg, chip, "eager"))
    add("GPT-2 shape, evaluation forward, eager", train["eval_forward_tokens_per_s"],
        tcfg.eval_batch_size * tcfg.block_size, price(trace_eval_batch(mcfg, tcfg), chip, "eager"))
    # the "t4" preset itself: Llama blocks, Muon, 128 windows per optimizer step
    pm, pt = S.preset(sweep["preset"])
    for r in sweep["rows"]:
        # runs before Muon could stack (2026-11-29) have no "muon_stacked": one matrix at a time
        stacked = r.get("muon_stacked", False)
        cfg = dataclasses.replace(pt, batch_size=r["micro_batch"], grad_accum_steps=r["grad_accum_steps"],
                                  loss_chunk=r["loss_chunk"], muon_stack="on" if stacked else "off")
        mode = "cuda_graphs" if r.get("cuda_graphs") else "compiled" if r["compiled"] else "eager"
        head = f", fused head + loss ({r['loss_chunk']:,}-row chunks)" if r["loss_chunk"] else ""
        head += ", Muon stacked" if stacked else ""
        label = "compiled, CUDA graphs" if mode == "cuda_graphs" else mode
        what = f"'{sweep['preset']}' preset, {r['micro_batch']} x {r['grad_accum_steps']}, {label}{head}"
        if mode != "eager":  # the code as it is now (see _compiled_form)
            add_compiled(what, r["tokens_per_s"], trace_train_step(pm, cfg, compiled=True), pm, cfg, mode)
        else:
            add(what, r["tokens_per_s"], cfg.tokens_per_step, step_cost(trace_train_step(pm, cfg), cfg, chip, mode))
    for r in decode["rows"]:
        if r["block_size"] == pm.block_size:
            add(f"'{sweep['preset']}' preset, cached greedy decoding, batch 1", r["tokens_per_s"]["kv_cache"], 1,
                price(trace_decode_step(pm), chip, "eager"),
                f"measured: {r['new_tokens']} tokens including the prefill and window hops; projected: the "
                "steady cached step")
            checks[-1]["launch_fit"] = True  # almost all launch overhead: this machine's CPU speed
    return {"run": str(run_dir), "gpu": gpu, "chip": chip_name, "date": train["machine"]["date"], "checks": checks}


def _measured_s(check: dict) -> float:
    return check["units"] / (sum(check["measured"]) / len(check["measured"]))


def _launch_factor(decode: dict) -> float:
    """The factor on launch overhead that reproduces a decoding figure, which is almost all launch
    overhead (its little GPU time taken as projected)."""
    return (_measured_s(decode) - decode["gpu_s"] - decode["host_s"]) / decode["cpu_s"]


def fit_calibration(checks: list[dict]) -> tuple[float, float]:
    """(GPU, CPU) factors: the CPU one from the decode figure, then the GPU one from eager training,
    so that both are reproduced exactly."""
    by = {c["what"]: c for c in checks}
    dec, train = by[CALIBRATION_FIT["cpu"]], by[CALIBRATION_FIT["gpu"]]
    f_cpu = _launch_factor(dec)
    f_gpu = (_measured_s(train) - f_cpu * train["cpu_s"] - train["host_s"]) / train["gpu_s"]
    return f_gpu, f_cpu


def run_launch_factor(checks: list[dict]) -> float | None:
    """The CPU factor refitted on a recorded run's own decoding figure (the check marked ``launch_fit``):
    the launch overhead of the machine that ran it, whose CPU need not be the H100 machine's. None
    without such a figure, or when it leaves no launch overhead to scale."""
    dec = next((c for c in checks if c.get("launch_fit")), None)
    if dec is None or dec["cpu_s"] <= 0:
        return None
    factor = _launch_factor(dec)
    return factor if factor > 0 else None


def validation_rows(checks: list[dict], factors: tuple[float, float] | None) -> list[dict]:
    rows = []
    for c in checks:
        mean = sum(c["measured"]) / len(c["measured"])
        raw = c["units"] / _seconds(c, None)
        row = {"what": c["what"], "measured": c["measured"], "projected": raw, "error_pct": 100 * (raw - mean) / mean,
               "gpu_ms": c["gpu_s"] * 1e3, "overhead_ms": c["cpu_s"] * 1e3, "host_ms": c["host_s"] * 1e3,
               "note": c["note"]}
        if factors:
            cal = c["units"] / _seconds(c, factors)
            row.update({"calibrated": cal, "calibrated_error_pct": 100 * (cal - mean) / mean,
                        "role": "fit" if c["what"] in CALIBRATION_FIT.values() else "check"})
        if "t4" in c:
            row["same_shape_on_t4"] = {"projected": c["units"] / _seconds(c["t4"], None)}
            if factors:
                row["same_shape_on_t4"]["calibrated"] = c["units"] / _seconds(c["t4"], factors)
        rows.append(row)
    return rows


# =====================================================================================
# Command line
# =====================================================================================


def _expand_chips(names: list[str]) -> list[str]:
    out = []
    for n in names:
        for c in CHIP_ALIASES.get(n, [n]):
            if c not in CHIPS:
                raise SystemExit(f"Unknown chip {n!r}. Known: {', '.join([*CHIPS, *CHIP_ALIASES])}.")
            if c not in out:
                out.append(c)
    return out


def _fmt_min(seconds: float) -> str:
    return f"{seconds / 60:,.1f}"


def _rate_cell(v: dict, calibrated: bool) -> str:
    """'eager / compiled' tok/s of a variant row, with the calibrated pair in brackets."""
    cell = f"{v['eager']:,.0f} / {v['compiled']:,.0f}"
    if calibrated:
        cell += f" ({v['eager_calibrated']:,.0f} / {v['compiled_calibrated']:,.0f})"
    return cell


def _print_tables(presets: dict, runs: dict, chips: list[str]):
    for name in presets:
        run = runs[name]
        print(f"\n### preset '{name}': {run['shape']} {run['arch']}, {run['optimizer']}, micro-batch "
              f"{run['batch_size']} x {run['block_size']} x {run['grad_accum_steps']} accumulation = "
              f"{run['tokens_per_step']:,} tokens/step, {run['max_steps']:,} steps, {run['evaluations']} evaluations "
              f"of {run['eval_tokens']:,} tokens; checkpoint {run['checkpoint_mb']:,.0f} MB; "
              f"{run['model_flops_per_token'] / 1e6:,.1f} MFLOP/token "
              f"(traced {run['traced_flops_per_token'] / 1e6:,.1f});"
              f" peak memory {run['peak_gib']:.1f} GiB\n")
        calibrated = "calibrated" in presets[name][chips[0]]["eager"]
        head = ("| chip | mode | tok/s | MFU | step ms | train min | eval min | ckpt min (SSD / Drive) | "
                "total min (SSD) | total min (Drive) | decode tok/s |")
        if calibrated:
            head += " calibrated: tok/s | total min (SSD) | decode tok/s |"
        print(head + " fits |")
        print("|---" * head.count("|") + "|")
        for chip in chips:
            for mode in ("eager", "compiled"):
                e = presets[name][chip][mode]
                line = (f"| {chip} | {mode} | {e['tok_s']:,.0f} | {e['mfu']:.1%} | {e['step_ms']:,.1f} | "
                        f"{_fmt_min(e['train_s'])} | {_fmt_min(e['eval_s'])} | {_fmt_min(e['ckpt_s'])} / "
                        f"{_fmt_min(e['ckpt_s_drive'])} | {_fmt_min(e['total_s'])} | {_fmt_min(e['total_s_drive'])} | "
                        f"{e['decode_tok_s']:,.0f} |")
                if calibrated:
                    c = e["calibrated"]
                    line += f" {c['tok_s']:,.0f} | {_fmt_min(c['total_s'])} | {c['decode_tok_s']:,.0f} |"
                print(line + f" {'yes' if e['fits'] else 'NO'} |")


def main(argv: list[str] | None = None) -> dict:
    import argparse
    import datetime
    import time

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["seed", "t4", "cpu"])
    parser.add_argument("--chips", nargs="+", default=list(CHIPS),
                        help=f"of {', '.join([*CHIPS, *CHIP_ALIASES])} (A100 = both sizes); default: all")
    parser.add_argument("--out", default=str(DEFAULT_OUT.relative_to(REPO)))
    parser.add_argument("--sweep", nargs="*", type=int, default=[8, 16, 32, 64, 128],
                        help="micro-batch sizes of the 't4' sweep (tokens per step fixed); none to skip")
    parser.add_argument("--fused-loss", nargs="*", type=int, default=[1024, 4096],
                        help="chunk sizes of the fused head + loss to price against the plain one; none to skip")
    parser.add_argument("--muon-stack", nargs="*", type=int, default=[64, 128],
                        help="micro-batch sizes at which to price the 't4' preset's Muon stacked and not; none to skip")
    parser.add_argument("--ceiling", nargs="*", type=int, default=[128, 256, 512],
                        help="micro-batch sizes (one per step) at which to price the 't4' shape's MFU as a step, "
                             "with CUDA graphs, and of the GPU's own time alone; none to skip")
    parser.add_argument("--no-calibration", action="store_true",
                        help="skip the H100 check and the calibration fitted on it")
    parser.add_argument("--validate", nargs="*", default=[], metavar="RUN_DIR",
                        help="recorded GPU runs (bench/gpu_runs/...) to check the projection against")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="FUSION_JSON",
                        help="with --validate: records of bench/inductor_groups.py (on that GPU, or --as-gpu); "
                             "compiled figures they match are priced again with Inductor's own kernels")
    parser.add_argument("--measured-tok-s", nargs="*", default=[], metavar="CHIP[:PRESET[:MODE]]=VALUE",
                        help="a measured training tok/s, to print the projection's error against it")
    args = parser.parse_args(argv)
    if args.inductor and not args.validate:
        raise SystemExit("--inductor prices the compiled figures of a recorded GPU run: give --validate RUN_DIR too.")
    chips = _expand_chips(args.chips)
    started = time.perf_counter()
    torch = _machinery().torch
    torch.set_num_threads(1)
    result = {"generated": datetime.date.today().isoformat(),
              "command": " ".join(["python bench/project_gpu.py", *(sys.argv[1:] if argv is None else argv)]),
              "machine": f"no GPU: a roofline projection from meta-device traces (torch {torch.__version__}); "
                         "nothing in it is a measurement",
              "assumptions": ASSUMPTIONS, "chips": {c: CHIPS[c] for c in chips}}

    factors = None
    if not args.no_calibration:
        t = time.perf_counter()
        checks = h100_checks()
        factors = fit_calibration(checks)
        rows = validation_rows(checks, factors)
        result["calibration"] = {
            "gpu_factor": factors[0], "cpu_factor": factors[1],
            "why": f"The a-priori model is optimistic on the H100 (table below). Two factors, fitted on two H100 "
                   f"figures of BENCHMARKS.md, scale the GPU time (fitted on '{CALIBRATION_FIT['gpu']}') and the CPU "
                   f"launch overhead (fitted on '{CALIBRATION_FIT['cpu']}', which is almost all overhead); the other "
                   "four figures check them. They carry the H100 machine's CPU and kernels to every chip, which is "
                   "a guess: a Colab host CPU is slower, and a T4's longer kernels waste less of their time "
                   "starting up. The 'calibrated' figures are a second estimate, not a better-founded one.",
            "measured": MEASURED_H100, "rows": rows}
        print(f"checked against the H100 figures in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    presets, runs = {}, {}
    for name in args.presets:
        t = time.perf_counter()
        p = project_preset(name, chips, factors)
        presets[name], runs[name] = p["chips"], p["run"]
        print(f"traced and priced '{name}' in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    result["runs"], result["presets"] = runs, presets
    _print_tables(presets, runs, chips)

    if args.sweep:
        t = time.perf_counter()
        sweep = micro_batch_sweep("t4", args.sweep, chips, factors)
        result["sweep"] = sweep
        print(f"swept {len(sweep['rows'])} micro-batch sizes in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        print(f"\n### micro-batch sweep, preset 't4' ({sweep['windows_per_step']} windows = "
              f"{sweep['tokens_per_step']:,} tokens per optimizer step)\n")
        shown = [c for c in ("T4", "H100") if c in chips]
        suffix = " (calibrated)" if factors else ""
        print("| micro-batch x accumulation | peak GiB | saved activations GiB | fits a 16 GB T4 | "
              + " | ".join(f"{c} tok/s eager / compiled{suffix}" for c in shown) + " |")
        print("|---|---|---|---|" + "---|" * len(shown))
        for r in sweep["rows"]:
            fit = "yes" if fits(r["peak_gib"], CHIPS["T4"]) else "NO"
            if fit == "yes" and r["peak_gib"] > CHIPS["T4"]["usable_gib"] - 1.0:
                fit = "yes, < 1 GiB to spare"
            cells = [_rate_cell(r["tok_s"][c], calibrated=bool(factors)) for c in shown]
            print(f"| {r['batch_size']} x {r['grad_accum_steps']} | {r['peak_gib']:.1f} | "
                  f"{r['saved_activations_gib']:.1f} | {fit} | " + " | ".join(cells) + " |")

    if args.fused_loss:
        t = time.perf_counter()
        fused = fused_loss_levers("t4", [64, 128], [0, *args.fused_loss], chips, factors)
        result["fused_loss"] = fused
        print(f"traced the fused head + loss in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        shown = [c for c in ("T4", "H100") if c in chips]
        print("\n### the head + loss, plain (chunk 0) or fused in chunks of rows, preset 't4' "
              "(tokens per optimizer step fixed)\n")
        print("| micro-batch x accumulation | chunk | peak GiB | fits a 16 GB T4 | "
              + " | ".join(f"{c} tok/s eager / compiled" for c in shown) + " |")
        print("|---|---|---|---|" + "---|" * len(shown))
        for r in fused["rows"]:
            cells = [f"{r['tok_s'][c]['eager']:,.0f} / {r['tok_s'][c]['compiled']:,.0f}" for c in shown]
            print(f"| {r['batch_size']} x {r['grad_accum_steps']} | {r['loss_chunk'] or 'plain'} | "
                  f"{r['peak_gib']:.1f} | {'yes' if fits(r['peak_gib'], CHIPS['T4']) else 'NO'} | "
                  + " | ".join(cells) + " |")

    if args.muon_stack:
        t = time.perf_counter()
        stack = muon_stack_levers("t4", args.muon_stack, chips, factors)
        result["muon_stack"] = stack
        print(f"traced Muon stacked and not in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        shown = [c for c in ("T4", "H100") if c in chips]
        suffix = " (calibrated)" if factors else ""
        print("\n### Muon one matrix at a time ('off') or stacked by shape ('on', the default on a GPU), "
              "preset 't4'\n")
        kchip = shown[-1] if shown else chips[0]
        print(f"| micro-batch x accumulation | muon_stack | {kchip} kernels per step, eager / compiled | "
              + " | ".join(f"{c} tok/s eager / compiled{suffix}" for c in shown) + " |")
        print("|---|---|---|" + "---|" * len(shown))
        for r in stack["rows"]:
            cells = [_rate_cell(r["tok_s"][c], calibrated=bool(factors)) for c in shown]
            print(f"| {r['batch_size']} x {r['grad_accum_steps']} | {r['muon_stack']} | "
                  f"{r['tok_s'][kchip]['eager_kernels']:,} / {r['tok_s'][kchip]['compiled_kernels']:,} | "
                  + " | ".join(cells) + " |")

    if args.ceiling:
        t = time.perf_counter()
        ceiling = mfu_ceiling("t4", args.ceiling, chips, factors)
        result["mfu_ceiling"] = ceiling
        print(f"traced the MFU ceiling in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        for c in [c for c in ("H100", "T4") if c in chips]:
            print(f"\n### how far MFU can go on the {c}: the 't4' shape, one micro-batch per step, compiled, Muon "
                  f"stacked, fused head + loss ({ceiling['loss_chunk']:,}-row chunks)\n")
            cal = " (calibrated)" if factors else ""
            print(f"| windows per step | step ms, a priori | MFU{cal} | MFU, CUDA graphs{cal} | MFU of the GPU's own time{cal} | "
                  "GPU time: " + " / ".join(GPU_TIME_KINDS) + " |")
            print("|---|---|---|---|---|---|")
            for r in ceiling["rows"]:
                e = r["chips"][c]
                mfu, graphs, top = (f"{e[k]:.1%}" + (f" ({e[k + '_calibrated']:.1%})" if factors else "")
                                    for k in ("mfu", "cuda_graphs_mfu", "gpu_only_mfu"))
                share = " / ".join(f"{e['gpu_share'][k]:.0%}" for k in GPU_TIME_KINDS)
                print(f"| {r['batch_size']} | {e['step_ms']:.1f} | {mfu} | {graphs} | {top} | {share} |")

    if factors:
        cal = result["calibration"]
        print(f"\n### check against the H100 figures of BENCHMARKS.md ({MEASURED_H100['shape']})\n")
        print(f"calibration: GPU time x {cal['gpu_factor']:.2f}, CPU launch overhead x {cal['cpu_factor']:.2f}\n")
        print("| figure | measured tok/s | projected tok/s | error | calibrated tok/s | error | role |")
        print("|---|---|---|---|---|---|---|")
        for r in cal["rows"]:
            print(f"| {r['what']} | {' / '.join(f'{m:,.0f}' for m in r['measured'])} | {r['projected']:,.0f} | "
                  f"{r['error_pct']:+.0f}% | {r['calibrated']:,.0f} | {r['calibrated_error_pct']:+.0f}% | "
                  f"{r['role']} |")
        for r in cal["rows"]:
            if "same_shape_on_t4" in r:
                t4 = r["same_shape_on_t4"]
                print(f"\nthe same shape on a T4, {r['what']}: projected {t4['projected']:,.0f} tok/s, calibrated "
                      f"{t4['calibrated']:,.0f} tok/s")

    inductor = [json.loads(Path(f).read_text()) for f in args.inductor]
    for run_dir in args.validate:
        t = time.perf_counter()
        run = gpu_run_checks(run_dir, inductor)
        rows = validation_rows(run["checks"], factors)
        launch = run_launch_factor(run["checks"]) if factors else None
        if launch is not None:  # the same figures with this machine's own launch overhead
            for r, h in zip(rows, validation_rows(run["checks"], (factors[0], launch))):
                r["run_calibrated"], r["run_calibrated_error_pct"] = h["calibrated"], h["calibrated_error_pct"]
        result.setdefault("validation", []).append({**{k: run[k] for k in ("run", "gpu", "chip", "date")},
                                                     "run_cpu_factor": launch, "rows": rows})
        print(f"checked against {run_dir} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        print(f"\n### check against the {run['gpu']} run of {run['date'][:10]} ({run_dir})\n")
        refit = f" | this host (CPU x {launch:.2f}) | error" if launch is not None else ""
        print(f"| figure | measured tok/s | projected tok/s | error | calibrated tok/s | error{refit} |")
        print("|---|---|---|---|---|---|" + ("---|---|" if refit else ""))
        for r in rows:
            cal = (f"{r['calibrated']:,.0f} | {r['calibrated_error_pct']:+.0f}%" if factors else "n/a | n/a")
            if refit:
                cal += f" | {r['run_calibrated']:,.0f} | {r['run_calibrated_error_pct']:+.0f}%"
            print(f"| {r['what']} | {r['measured'][0]:,.0f} | {r['projected']:,.0f} | {r['error_pct']:+.0f}% | {cal} |")

    for item in args.measured_tok_s:
        key, _, value = item.partition("=")
        parts = key.split(":")
        chip = _expand_chips([parts[0]])[0]
        if chip not in chips:
            raise SystemExit(f"--measured-tok-s names {chip}, which is not among --chips.")
        measured = float(value)
        for name in ([parts[1]] if len(parts) > 1 else list(presets)):
            for mode in ([parts[2]] if len(parts) > 2 else ["eager", "compiled"]):
                e = presets[name][chip][mode]
                line = (f"measured {measured:,.0f} tok/s on {chip} vs projected {e['tok_s']:,.0f} for '{name}' {mode}: "
                        f"error {100 * (e['tok_s'] - measured) / measured:+.1f}%")
                if "calibrated" in e:
                    c = e["calibrated"]["tok_s"]
                    line += f"; calibrated {c:,.0f}, error {100 * (c - measured) / measured:+.1f}%"
                print(line)

    out = Path(args.out)
    if not out.is_absolute():
        out = REPO / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwrote {out} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
