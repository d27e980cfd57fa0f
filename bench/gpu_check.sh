#!/usr/bin/env bash
# The GPU check on one CUDA GPU; every figure lands as JSON in OUTDIR. Each step below has a time
# limit; all of them add up to 1,560 s, so where one command may run at most 10 minutes, run it in
# three calls (GPU_CHECK_STEPS, below; BENCHMARKS.md section 5 gives them).
#
#   bash bench/gpu_check.sh OUTDIR
#   GPU_CHECK_STEPS=train,fused,decode,sweep bash bench/gpu_check.sh OUTDIR         # part A, at most 460 s
#   GPU_CHECK_STEPS=tests,profile,fusion bash bench/gpu_check.sh OUTDIR              # at most 540 s, a call of its own
#   GPU_CHECK_STEPS=ttl,seed,notebook bash bench/gpu_check.sh OUTDIR            # part B, at most 560 s
#
# Steps (GPU_CHECK_STEPS names them; the default is all, in this order):
# tests    The GPU code paths' unit tests (tests/test_cuda.py: fp16 + GradScaler, bf16 + compile,
#          compile + CUDA graphs (bf16; fp16 + GradScaler), pinned loads, fused AdamW, KV cache,
#          CUDA-graph decoding, padded vocabulary on the device). -> OUTDIR/test_cuda.log
# train    Training throughput at the seed's shape (6/6/384, vocab 50,257, block 128) with the "t4"
#          preset's micro-batch (64 x 128 tokens): the plain reference, slm_utils with its GPU
#          defaults, each lever switched off in turn (padded vocabulary, fused AdamW, pinned loads),
#          and the fp16 (+ GradScaler) and bf16 paths with torch.compile off and on, compile with CUDA
#          graphs (TrainConfig.cuda_graphs), and the fused head + loss (TrainConfig.loss_chunk, 4,096-row
#          chunks) eager and compiled. Also the
#          evaluation share of compute and the derived T4 estimate. -> OUTDIR/train.json (+ summary.json, summary.md)
# fused    The head + loss alone at 8,192 rows, plain against fused in chunks of 1,024 to 8,192
#          rows: time and peak memory (bench/bench_fused_loss.py). -> OUTDIR/fused_loss.json
# decode   Batch-1 greedy decoding of 512 new tokens: no cache, the KV cache, and the KV cache
#          replayed from a CUDA graph (slm_utils.GraphDecoder), at contexts of 128 and 512
#          (bench/bench_decode.py). -> OUTDIR/decode.json
# sweep    The "t4" preset itself (Llama blocks, Muon, bf16) at 128 windows per optimizer step cut
#          into micro-batches of 16, 32, 64 and 128, eager, and 128 x 1 compiled with the fused head +
#          loss, without and with CUDA graphs: tokens/s, MFU and peak memory (bench/bench_microbatch.py).
#          Muon stacks same-shape matrices, its GPU default; 128 x 1 eager and compiled run again with
#          Muon one matrix at a time, to measure that lever. -> OUTDIR/microbatch.json
# profile  Where a step's time goes: GPU kernel time against wall time, kernel launches, and the
#          optimizer's share, eager and compiled, for the "t4" preset at 64 x 2 and for the GPT-2 +
#          AdamW recipe (bench/profile_step.py). -> OUTDIR/profile{,_gpt2}.json
# fusion   What torch.compile's Inductor generated for one micro-batch of the two compiled figures
#          the projection is checked on: the "t4" preset at 128 x 1 with the fused head + loss (as
#          the sweep runs it) and the lever table's GPT-2 shape (64 windows, dropout 0.1): its
#          kernels and their bytes per graph, beside the projection's fused groups
#          (bench/inductor_groups.py). `project_gpu.py --validate OUTDIR --inductor OUTDIR/fusion*.json`
#          then prices those figures with these kernels. -> OUTDIR/fusion{,_gpt2}.json
# ttl      Timed runs to two target val losses, the bigram baseline and 0.5 below it (see
#          bench/time_to_loss.py): on the embedded Shakespeare corpus, the "t4" preset's recipe and
#          the old GPT-2 + AdamW recipe, each eager and with torch.compile (its warm-up counted), at
#          most 400 steps; and the new recipe in fp16 + GradScaler with Muon's Newton-Schulz in fp16,
#          as a T4 runs it. The eager runs and the fp16 one go first, the compiled ones last.
#          -> OUTDIR/time_to_loss{,_old,_fp16,_compiled,_old_compiled}.json
# seed     The seed's recipe the same way, long enough to pass the bigram baseline, so the tokens
#          each recipe needs to get there compare fairly. -> OUTDIR/time_to_loss_seed.json
# notebook The notebook's GPU path, which CI (CPU only) never runs: every code cell in order as a
#          plain script (bench/notebook_as_script.py), "t4" preset cut to 300 steps. -> OUTDIR/notebook.log
# Last, whatever the steps: the headline figures of every result in OUTDIR, in one file.
#          -> OUTDIR/gpu_check.json
# The roofline projection (bench/project_gpu.py) needs no GPU: compare its committed
# bench/projection.json with these figures afterwards (BENCHMARKS.md section 8 says how).
#
# A step that fails or runs out of time is reported and the others still run; the exit status
# is non-zero if any step failed.
#
# SLM_GPU_CHECK_DRY_RUN=1 runs the same steps on the CPU with a tiny model and a few steps, to
# check the plumbing on a machine without a GPU; its figures mean nothing.
set -euo pipefail
OUT="${1:?usage: bash bench/gpu_check.sh OUTDIR}"

# the steps to run: GPU_CHECK_STEPS, comma-separated (spaces ignored), or all of them
ALL_STEPS=tests,train,fused,decode,sweep,profile,fusion,ttl,seed,notebook
STEPS="${GPU_CHECK_STEPS:-$ALL_STEPS}"
STEPS="${STEPS//[[:space:]]/}"
IFS=, read -ra SELECTED <<< "$STEPS"
if [ "${#SELECTED[@]}" -eq 0 ]; then
  echo "GPU_CHECK_STEPS='${GPU_CHECK_STEPS:-}' names no step; the steps are $ALL_STEPS" >&2
  exit 2
fi
for s in "${SELECTED[@]}"; do
  case ",$ALL_STEPS," in
    *",$s,"*) ;;  # an empty name (",,") never matches: ALL_STEPS has none
    *) echo "GPU_CHECK_STEPS: unknown step '$s'; the steps are $ALL_STEPS" >&2; exit 2 ;;
  esac
done
want() { case ",$STEPS," in *",$1,"*) return 0;; *) return 1;; esac; }

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
start=$SECONDS

if [ "${SLM_GPU_CHECK_DRY_RUN:-0}" = "1" ]; then
  echo "DRY RUN on the CPU: checks the script, measures nothing worth keeping" >&2
  TRAIN_ARGS=(--device cpu --quick --shape tiny --batch-size 4 --warmup 1 --steps 2
              --levers --skip-compile --grid-dtypes bfloat16 --grid-compile off)
  TTL_ARGS=(--device cpu --shape tiny --max-steps 6 --batch-size 4 --eval-interval 2 --eval-tokens 256)
  SEED_TTL_ARGS=(--device cpu --shape tiny --max-steps 3 --batch-size 2 --eval-interval 1 --eval-tokens 256)
  NB_ARGS=(--preset cpu --max-steps 4)
  FUSED_ARGS=(--device cpu --rows 256 --width 32 --chunks 0,64 --reps 1)
  DECODE_ARGS=(--device cpu --new 8 --repeats 1 --block-sizes 128)
  SWEEP_ARGS=(--device cpu --tiny --micro-batches 64,128 --unstacked 128 --warmup 1 --steps 1)
  PROFILE_ARGS=(--device cpu --tiny --modes eager --warmup 1 --steps 1)
  FUSION_ARGS=(--device cpu --tiny)
  FUSION_T4=(--micro-batch 4 --loss-chunk 256)
  FUSION_GPT2=(--micro-batch 4)
else
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: bench/gpu_check.sh needs a GPU')"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,power.limit,clocks.max.sm \
    --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
  TRAIN_ARGS=(--device cuda --warmup 3 --steps 6
              --grid-dtypes float16,bfloat16 --grid-compile off,on)
  TTL_ARGS=(--device cuda --max-steps 400 --eval-interval 20)
  SEED_TTL_ARGS=(--device cuda --max-steps 150 --eval-interval 5)
  NB_ARGS=(--preset t4 --max-steps 300)
  FUSED_ARGS=(--device cuda --rows 8192 --chunks 0,1024,2048,4096,8192)
  DECODE_ARGS=(--device cuda --new 512 --repeats 3)
  SWEEP_ARGS=(--device cuda --micro-batches 16,32,64,128 --compiled 128:4096 --cuda-graphs 128:4096
              --unstacked 128,128:4096 --warmup 3 --steps 6)
  PROFILE_ARGS=(--device cuda --modes eager,compiled --warmup 3 --steps 5)
  FUSION_ARGS=(--device cuda)
  FUSION_T4=(--micro-batch 128 --loss-chunk 4096)  # the sweep's compiled 128 x 1 rows
  FUSION_GPT2=(--micro-batch 64)  # the lever table's shape
fi

failed=()
step() {  # step NAME SECONDS LOG COMMAND...: run it under a time limit, log it, note a failure
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name (at most ${limit} s) ==" >&2
  local rc
  timeout "$limit" "$@" 2>&1 | tee "$log" && rc=0 || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "!! $name failed or ran out of time; see $log" >&2
    failed+=("$name")
  fi
}

if want tests; then  # in a dry run the GPU tests only report themselves skipped
  step "GPU unit tests" 180 "$OUT/test_cuda.log" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
fi
if want train; then
  step "training throughput" 220 "$OUT/train.log" "$PY" bench/run.py --only train --out "$OUT" "${TRAIN_ARGS[@]}"
fi
if want fused; then
  step "fused head + loss alone" 30 "$OUT/fused_loss.log" \
    "$PY" bench/bench_fused_loss.py --out "$OUT/fused_loss.json" "${FUSED_ARGS[@]}"
fi
if want decode; then
  step "decoding: cache and CUDA graph" 60 "$OUT/decode.log" \
    "$PY" bench/bench_decode.py --out "$OUT/decode.json" "${DECODE_ARGS[@]}"
fi
if want sweep; then
  step "micro-batch sweep of the t4 preset" 150 "$OUT/microbatch.log" \
    "$PY" bench/bench_microbatch.py --out "$OUT/microbatch.json" "${SWEEP_ARGS[@]}"
fi
if want profile; then
  step "profile of a step, t4 preset" 90 "$OUT/profile.log" \
    "$PY" bench/profile_step.py --out "$OUT/profile.json" "${PROFILE_ARGS[@]}"
  step "profile of a step, GPT-2 + AdamW" 90 "$OUT/profile_gpt2.log" \
    "$PY" bench/profile_step.py --out "$OUT/profile_gpt2.json" --set arch=gpt2 optimizer=adamw "${PROFILE_ARGS[@]}"
fi
if want fusion; then
  step "Inductor's kernels against the projection's, t4 preset" 90 "$OUT/fusion.log" \
    "$PY" bench/inductor_groups.py --out "$OUT/fusion.json" "${FUSION_T4[@]}" "${FUSION_ARGS[@]}"
  step "Inductor's kernels against the projection's, GPT-2 + AdamW" 90 "$OUT/fusion_gpt2.log" \
    "$PY" bench/inductor_groups.py --out "$OUT/fusion_gpt2.json" "${FUSION_GPT2[@]}" \
      --set arch=gpt2 optimizer=adamw dropout=0.1 bias=True tie_weights=True "${FUSION_ARGS[@]}"
fi
if want ttl; then
  # eager first, then fp16 as on a T4, then the compiled runs (each pays its compile warm-up): if the
  # machine's time runs out, what is lost is a compiled figure
  for recipe in new old; do
    tag=$([ "$recipe" = old ] && echo "_old" || echo "")
    step "time to target val loss, $recipe recipe, eager" 50 "$OUT/time_to_loss$tag.log" \
      "$PY" bench/time_to_loss.py --recipe "$recipe" --out "$OUT/time_to_loss$tag.json" "${TTL_ARGS[@]}"
  done
  # as a T4 runs it: fp16 autocast with GradScaler, and Muon orthogonalizing in fp16 (a T4's "auto";
  # on this GPU "auto" would pick bf16)
  step "time to target val loss, new recipe, fp16 + GradScaler + fp16 Muon (as on a T4)" 50 "$OUT/time_to_loss_fp16.log" \
    "$PY" bench/time_to_loss.py --recipe new --dtype float16 --muon-ns-dtype float16 \
    --out "$OUT/time_to_loss_fp16.json" "${TTL_ARGS[@]}"
  for recipe in new old; do
    tag=$([ "$recipe" = old ] && echo "_old" || echo "")
    step "time to target val loss, $recipe recipe, compiled" 70 "$OUT/time_to_loss${tag}_compiled.log" \
      "$PY" bench/time_to_loss.py --recipe "$recipe" --out "$OUT/time_to_loss${tag}_compiled.json" --compile "${TTL_ARGS[@]}"
  done
fi
if want seed; then
  # the seed's recipe takes 131K tokens per step: 150 steps (20M tokens; 94.5 s of training on the H200, BENCHMARKS.md section 5),
  # evaluated every 5 (last.pt at most every 5 minutes, as in the "t4" preset: see time_to_loss.py)
  step "time to target val loss, seed recipe" 150 "$OUT/time_to_loss_seed.log" \
    "$PY" bench/time_to_loss.py --recipe seed --out "$OUT/time_to_loss_seed.json" "${SEED_TTL_ARGS[@]}"
fi
if want notebook; then
  NB_WORK="$(mktemp -d)"  # token files and checkpoints: large, and not figures
  step "the notebook's GPU path" 120 "$OUT/notebook.log" \
    "$PY" bench/notebook_as_script.py --out-dir "$NB_WORK" "${NB_ARGS[@]}"
  rm -rf "$NB_WORK"
fi

"$PY" - "$OUT" "$((SECONDS - start))" "$(IFS=';'; echo "${failed[*]:-}")" <<'EOF'
import json, sys
from pathlib import Path

out, seconds, failed = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def last_line(name, marker=""):
    path = out / name
    lines = [l for l in path.read_text(errors="replace").splitlines() if marker in l] if path.is_file() else []
    return lines[-1].strip() if lines else None


summary = {"check_seconds": seconds, "failed_steps": failed.split(";") if failed else None, "gpu_tests": last_line("test_cuda.log"),
           "notebook": last_line("notebook.log", "####")}
train = load("train.json")
if train:
    summary.update({
        "device": train["machine"]["device"],
        "date": train["machine"]["date"],
        "batch": f"{train['settings']['batch_size']} x {train['settings']['block_size']}",
        "peak": train["peak"],
        "throughput_tokens_per_s": {r["name"]: round(r["tokens_per_s"]) for r in train["rows"]},
        "mfu": {r["name"]: round(r["mfu"], 4) for r in train["rows"]},
        "t4_estimate": train.get("t4_estimate"),
        "eval_share": {k: v["fraction"] for k, v in train["eval_cost"].items() if isinstance(v, dict)},
    })
decode = load("decode.json")
if decode:
    summary["decode"] = [{k: r[k] for k in ("block_size", "tokens_per_s", "cache_over_no_cache", "graph_over_cache",
                                            "same_tokens")} for r in decode["rows"]]
sweep = load("microbatch.json")
if sweep:
    summary["microbatch"] = [{k: r[k] for k in ("micro_batch", "grad_accum_steps", "compiled", "loss_chunk",
                                                "muon_stacked", "tokens_per_s", "mfu", "peak_allocated_gib")}
                             for r in sweep["rows"]]
for key in ("profile", "profile_gpt2"):
    prof = load(key + ".json")
    if prof:
        summary[key] = [{k: r[k] for k in ("mode", "wall_ms", "kernel_ms", "gpu_busy", "kernels", "optimizer_cpu_ms",
                                           "optimizer_kernels")} for r in prof["rows"]]
for key in ("fusion", "fusion_gpt2"):
    fusion = load(key + ".json")
    if fusion:
        summary[key] = [{"region": g["region"], "inductor": g["inductor"], "projection": g["projection"]}
                        for g in fusion["graphs"]]
fused = load("fused_loss.json")
if fused:
    summary["fused_loss"] = [{k: r[k] for k in ("chunk", "median_ms", "peak_extra_mb", "time_vs_plain",
                                                "memory_vs_plain")} for r in fused["results"]]
for key in ("time_to_loss", "time_to_loss_compiled", "time_to_loss_old", "time_to_loss_old_compiled",
            "time_to_loss_fp16", "time_to_loss_seed"):
    ttl = load(key + ".json")
    if ttl:
        summary[key] = {k: ttl[k] for k in ("recipe", "target", "harder_target", "target_source", "reached",
                                            "seconds_to_target", "time_to_target", "seconds_to_harder",
                                            "time_to_harder", "seconds_to_levels", "tokens_per_s",
                                            "best_val_loss", "train_config")}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
echo "gpu_check: done in $((SECONDS - start)) s; JSON in $OUT" >&2
if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu_check: these steps failed: ${failed[*]}" >&2
  exit 1
fi
