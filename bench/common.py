"""Shared pieces of the benchmark: machine description, device peaks, FLOP counts, timing, tables.

Nothing here measures anything on import; every section module calls these functions.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# The presets' recipe before the architecture and optimizer options, as preset overrides: GPT-2
# blocks, tied head, AdamW, no curriculum, the plain head + loss. (The old "t4" also had AdamW at 8e-4;
# time_to_loss.py adds it.)
OLD_RECIPE = dict(arch="gpt2", n_kv_head=None, tie_weights=True, optimizer="adamw", embedding_lr=None,
                  curriculum_steps=0, loss_chunk=0)


# ---- machine -------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        import importlib.metadata

        return importlib.metadata.version(name)
    except Exception:
        return None


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (commit + ("+dirty" if dirty else "")) or None
    except Exception:
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch.cuda.is_available() is False on this machine.")
    return device


def device_description(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return {"type": "cpu", "name": cpu_model()}


def machine_info(device: torch.device | None = None) -> dict:
    """What the figures were measured on. The load average tells whether other work shared the cores."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        physical, mem_gib = None, None
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "memory_gib": mem_gib,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": _version("numpy"),
        "tiktoken": _version("tiktoken"),
        "datasets": _version("datasets"),
        "git_commit": _git_commit(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device is not None:
        info["device"] = device_description(device)
    elif torch.cuda.is_available():
        info["device"] = device_description(torch.device("cuda"))
    else:
        info["device"] = device_description(torch.device("cpu"))
    return info


def machine_line(info: dict) -> str:
    dev = info.get("device", {})
    gpu = f", GPU {dev['name']} (sm {dev['capability']})" if dev.get("type") == "cuda" else ""
    return (f"{info['cpu_model']}, {info['logical_cores']} logical cores{gpu}; torch {info['torch']}, "
            f"{info['torch_threads']} threads; {info['date']}; 1-minute load average {info['load_average_1m']} at the "
            f"start, {info.get('load_average_1m_end', 'n/a')} at the end")


# ---- device peaks --------------------------------------------------------------------

# Dense (no sparsity) fp16/bf16 tensor-core peaks from the vendors' datasheets, in TFLOP/s.
# Order matters: the first pattern that matches the device name wins.
CUDA_PEAK_TFLOPS: list[tuple[str, float]] = [
    (r"H200", 989.0),
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.0),  # SXM
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"V100", 125.0),
    (r"\bT4\b", 65.0),
]
T4_PEAK_TFLOPS = 65.0


def table_peak_tflops(device_name: str) -> float | None:
    for pattern, tflops in CUDA_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """Best throughput of ``reps`` n x n matmuls: the machine's practical dense-math ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: thread pools, kernels
    sync(device)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best / 1e12


def device_peak(device: torch.device, quick: bool) -> dict:
    """The peak MFU is stated against: a datasheet figure on known GPUs, else measured."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = table_peak_tflops(name)
        if tflops is not None:
            return {"tflops": tflops, "source": f"datasheet dense fp16/bf16 peak for {name}"}
        dtype = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        tflops = measure_matmul_tflops(device, dtype, 8192, reps=5)
        return {"tflops": tflops, "source": f"measured: best of 5 {dtype} 8192^3 matmuls on {name} (not in the table)"}
    n = 2048 if quick else 3072
    tflops = measure_matmul_tflops(device, torch.float32, n, reps=5)
    return {"tflops": tflops,
            "source": f"measured: best of 5 fp32 {n}x{n} matmuls with {torch.get_num_threads()} threads "
                      "(a practical CPU ceiling, not a datasheet peak)"}


# ---- FLOPs ---------------------------------------------------------------------------

FLOPS_FORMULA = ("FLOPs per token = 6 * N + 12 * n_layer * n_embd * T, where N counts the parameters that "
                 "multiply activations: every parameter except the position table and, when the head is untied, "
                 "the input token table (both are lookups), with a tied token matrix counted once (it is the "
                 "lm_head matmul) and padded vocabulary rows left out; 6N covers forward (2N) and backward (4N); "
                 "12*L*C*T is attention's QK^T and AV over the full T x T square (PaLM appendix B / nanoGPT "
                 "convention).")


def matmul_parameters(model) -> int:
    """N of ``FLOPS_FORMULA``: the parameters of a slm_utils.GPT that multiply activations."""
    import slm_utils

    counts = slm_utils.count_parameters(model)
    untied_table = 0 if slm_utils.unwrap(model).config.tie_weights else counts["token_embedding"]  # a lookup
    return counts["total"] - counts["position_embedding"] - untied_table


def flops_per_token(model, block_size: int) -> float:
    """``FLOPS_FORMULA`` for a slm_utils.GPT (the projection's MFU numerator too)."""
    import slm_utils

    cfg = slm_utils.unwrap(model).config
    return 6 * matmul_parameters(model) + 12 * cfg.n_layer * cfg.n_embd * block_size


# ---- timing --------------------------------------------------------------------------


def sync(device: torch.device | str):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summarize_times(times: Sequence[float]) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"n": len(times), "median_s": statistics.median(times), "min_s": times[0], "max_s": times[-1],
            "q1_s": q[0], "q3_s": q[2]}


def interleaved(contenders: dict[str, Callable[[], object]], device, warmup: int, rounds: int,
                steps_per_round: int = 1, log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Per-call times of each contender, interleaved round by round.

    Every contender first runs ``warmup`` untimed calls (compilation, allocator, caches). Then, in
    each of ``rounds`` rounds, every contender runs ``steps_per_round`` timed calls in turn, so a
    slow spell on a shared machine hits all of them alike rather than one.
    """
    for name, fn in contenders.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        sync(device)
        if log:
            log(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        for name, fn in contenders.items():
            for _ in range(steps_per_round):
                times[name].append(time_call(fn, device))
        if log:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {statistics.median(t) * 1e3:.0f} ms"
                                                          for n, t in times.items()))
    return times


# ---- output --------------------------------------------------------------------------


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: (key in each row, header). Values are formatted with ``fmt``."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def goal_row(goal: str, measured, target: str, passed: bool | None) -> dict:
    return {"goal": goal, "measured": measured, "target": target,
            "status": "n/a" if passed is None else ("met" if passed else "NOT met")}


GOAL_COLUMNS = [("goal", "goal"), ("measured", "measured"), ("target", "target"), ("status", "status")]


def write_json(path: Path, obj: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_result(path: Path, res: dict, table: str) -> int:
    """A script's result: the JSON with its markdown table inside, and the table printed; status 0."""
    res["markdown"] = table
    write_json(path, res)
    print(table)
    return 0


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def bench_tmpdir(prefix: str) -> str:
    """A scratch folder on disk (not /dev/shm: the data section measures memory)."""
    import tempfile

    return tempfile.mkdtemp(prefix=f"slm-bench-{prefix}-")


# ---- the per-step GPU scripts' command line ---------------------------------------------


def parse_override(text: str) -> tuple[str, object]:
    """One ``--set KEY=VALUE`` pair, read as the command line of slm_utils reads it."""
    import slm_utils

    (key, value), = slm_utils.parse_overrides([text]).items()
    return key, value


def step_script_parser(doc: str, overrides: bool = True):
    """The arguments the scripts that time or inspect one preset's step share: --out, --device,
    --preset and (``overrides``) --set."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="t4")
    if overrides:
        p.add_argument("--set", type=parse_override, nargs="*", default=[], metavar="KEY=VALUE",
                       help="preset overrides, e.g. arch=gpt2 optimizer=adamw")
    return p
