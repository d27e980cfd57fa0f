"""Section "train": training throughput of slm_utils.GPT against the plain reference, and the levers.

Every contender runs the same batch shape on windows of the same prepared corpus (the same
random windows, from identically seeded generators), the same number of warm-up and timed
steps, interleaved step by step. One step is one micro-batch plus one optimizer step.

- "reference": bench/reference_gpt.py, the notebook-style model and loop.
- "slm_utils": slm_utils.GPT stepped by slm_utils.train_step, the step train() takes: AdamW
  from configure_optimizer, autocast per choose_amp_dtype, GradScaler for fp16, unscale, clip,
  the finiteness check, step. A separate row runs slm_utils.train() itself, to show the
  loop around the step costs little.
- On CUDA, the levers, each switched off (or on, for torch.compile and the fused head + loss) from
  the slm_utils row.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import common
import reference_gpt as ref
import slm_utils as S

SHAPES = {
    # the seed's model: 6 layers, 6 heads, 384 wide, GPT-2 vocabulary, 128-token windows
    "seed": dict(vocab_size=50257, block_size=128, n_layer=6, n_head=6, n_embd=384, dropout=0.1, bias=True),
    # only for checking the code paths quickly (tests of the benchmark itself), never for figures
    "tiny": dict(vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1, bias=True),
}

# The seed's evaluation schedule (SEED_FACTS): every 500 micro-steps, 500 random batches of
# 32 x 128 tokens on each of the two splits.
SEED_EVAL = dict(interval_micro_steps=500, batches=500, splits=2, batch_tokens=32 * 128)


FUSED_LOSS_CHUNK = 4096  # rows per chunk of the fused head + loss lever (the projection's best of 1,024 and 4,096)


@dataclass(frozen=True)
class Variant:
    name: str
    impl: str = "slm"  # "slm" or "reference"
    pad: int = 1  # pad_vocab_multiple
    fused: bool = False  # fused AdamW
    pinned: bool = False  # pinned host memory + non_blocking copies
    dtype: str = "float32"  # autocast dtype
    compile: bool = False  # torch.compile
    cuda_graphs: bool = False  # with compile: forward and backward replayed from CUDA graphs
    loss_chunk: int = 0  # >0: head + loss fused, this many rows at a time (slm_utils.fused_linear_cross_entropy)

    def describe(self) -> str:
        if self.impl == "reference":
            return f"plain reference, {self.dtype}"
        parts = [f"pad {self.pad}", "fused AdamW" if self.fused else "AdamW (not fused)",
                 "pinned loads" if self.pinned else "plain loads", self.dtype + (" + GradScaler" if self.dtype == "float16" else ""),
                 ("compiled + CUDA graphs" if self.cuda_graphs else "compiled") if self.compile else "eager"]
        if self.loss_chunk:
            parts.append(f"fused head + loss ({self.loss_chunk}-row chunks)")
        return ", ".join(parts)


def default_variants(device: torch.device, levers: bool, grid_dtypes: list[str], grid_compile: list[bool]) -> list[Variant]:
    """The reference, our default for the device, and (GPU, or when asked) one row per lever."""
    cuda = device.type == "cuda"
    auto = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[
        S.choose_amp_dtype(device.type)]
    base = Variant("slm_utils", pad=64 if cuda else 1, fused=True, pinned=cuda, dtype=auto)
    out = [Variant("reference", impl="reference", dtype=auto), base]
    if levers:
        out.append(dataclasses.replace(base, name="pad 64 " + ("off" if base.pad == 64 else "on"),
                                       pad=1 if base.pad == 64 else 64))
        out.append(dataclasses.replace(base, name="fused AdamW " + ("off" if base.fused else "on"), fused=not base.fused))
        if cuda:  # pinning needs an accelerator; on a CPU there is nothing to copy
            out.append(dataclasses.replace(base, name="pinned loads off", pinned=False))
        if cuda:  # fp16 + GradScaler against bf16, whichever the device does not default to
            alt = "bfloat16" if auto == "float16" else "float16"
            label = "fp16 + GradScaler" if alt == "float16" else "bf16"
        else:  # CPU autocast speaks bf16 only in practice
            alt, label = "bfloat16", "bf16 autocast"
        out.append(dataclasses.replace(base, name=f"{label} instead of {auto}", dtype=alt))
        out.append(dataclasses.replace(base, name="torch.compile on", compile=True))
        if cuda:  # one micro-batch per step here, as TrainConfig.cuda_graphs requires
            out.append(dataclasses.replace(base, name="torch.compile + CUDA graphs on", compile=True, cuda_graphs=True))
        out.append(dataclasses.replace(base, name="fused head + loss on", loss_chunk=FUSED_LOSS_CHUNK))
        if cuda:
            out.append(dataclasses.replace(base, name="fused head + loss on, compiled", compile=True,
                                           loss_chunk=FUSED_LOSS_CHUNK))
    for dtype in grid_dtypes:
        for comp in grid_compile:
            v = dataclasses.replace(base, name=f"{dtype}, compile {'on' if comp else 'off'}", dtype=dtype, compile=comp)
            out.append(v)
    seen, unique = {}, []
    for v in out:  # one measurement per distinct configuration
        key = dataclasses.replace(v, name="")
        if key in seen:
            seen[key].append(v.name)
            continue
        seen[key] = [v.name]
        unique.append(v)
    return [dataclasses.replace(v, name=" = ".join(seen[dataclasses.replace(v, name="")])) for v in unique]


def _plain_loader(data_dir, batch_size, block_size, device, generator):
    """The same windows slm_utils.get_batch draws, in the same one (B, T+1) copy, but a plain
    ``.to(device)`` from pageable memory: the "pinned loads off" lever changes only the pinning."""
    path = Path(data_dir) / "train.bin"

    def load():
        data = np.memmap(path, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
        xy = torch.from_numpy(data[ix[:, None] + np.arange(block_size + 1)].astype(np.int64)).to(device)
        return xy[:, :-1], xy[:, 1:]

    return load


class Contender:
    """A model, its optimizer and a ``step()`` that trains on one micro-batch."""

    def __init__(self, v: Variant, shape: dict, data_dir, batch_size: int, device: torch.device, seed: int = 1234):
        self.variant, self.device = v, device
        self.dtype = getattr(torch, v.dtype)
        self.batch_size, self.block_size = batch_size, shape["block_size"]
        gen = torch.Generator().manual_seed(seed)  # every contender draws the same windows
        torch.manual_seed(seed)
        cfg = S.GPTConfig(**shape, pad_vocab_multiple=v.pad)
        if v.impl == "reference":
            self.model = ref.ReferenceGPT(ref.RefConfig.like(cfg)).to(device)
            opt = ref.make_optimizer(self.model)
            loader = ref.make_batch_loader(data_dir, batch_size, self.block_size, device, gen)
            self.step = ref.make_train_step(self.model, opt, loader, device, self.dtype, grad_clip=0.5)
            self.forward = self.model
            return
        self.model = S.GPT(cfg).to(device)
        tcfg = S.TrainConfig(batch_size=batch_size, block_size=self.block_size, max_steps=10_000, device=str(device))
        opt = S.configure_optimizer(self.model, tcfg, device.type, fused=v.fused)
        if v.pinned:
            def loader():
                return S.get_batch(data_dir, "train", batch_size, self.block_size, device, gen)
        else:
            loader = _plain_loader(data_dir, batch_size, self.block_size, device, gen)
        scaler = torch.amp.GradScaler(device.type, enabled=(self.dtype == torch.float16))  # as train() has it
        fwd = S.compile_for_training(self.model, v.cuda_graphs) if v.compile else self.model
        self.forward = fwd
        dtype, clip = self.dtype, tcfg.grad_clip
        state = {"step": 0}
        self.model.train()

        def step():  # what slm_utils.train() does per optimizer step, with grad_accum_steps = 1
            lr = S.get_lr(state["step"], tcfg)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            result = S.train_step(fwd, opt, scaler, [loader()], grad_clip=clip, device=device, dtype=dtype,
                                  loss_chunk=v.loss_chunk)
            state["step"] += int(result.finite)
            return result

        self.step = step

    @torch.no_grad()
    def eval_forward_fn(self, data_dir):
        """A forward pass in eval mode with the loss, as an evaluation batch costs."""
        x, y = _plain_loader(data_dir, self.batch_size, self.block_size, self.device, torch.Generator().manual_seed(7))()

        def run():
            self.model.eval()
            with torch.no_grad(), S._autocast(self.device, self.dtype):
                _, loss = self.forward(x, y)
            loss.item()
            self.model.train()

        return run


def check_reference_equivalence(shape: dict) -> dict:
    """Both models compute the same function: copy our weights into the reference, compare outputs."""
    torch.manual_seed(0)
    cfg = S.GPTConfig(**{**shape, "dropout": 0.0})
    ours = S.GPT(cfg).eval()
    plain = ref.load_from_slm(ref.ReferenceGPT(ref.RefConfig.like(cfg)), ours).eval()
    x = torch.randint(0, cfg.vocab_size, (1, min(16, cfg.block_size)))
    with torch.no_grad():
        a, la = ours(x, x)
        b, lb = plain(x, x)
    return {"max_abs_logit_diff": float((a - b).abs().max()), "loss_slm_utils": float(la), "loss_reference": float(lb),
            "parameters_slm_utils": S.count_parameters(ours)["total"], "parameters_reference": ref.count_parameters(plain)}


def train_loop_check(v: Variant, shape: dict, data_dir, batch_size: int, device: torch.device, warmup: int, steps: int) -> dict:
    """Time slm_utils.train() itself, step by step, through its callback."""
    torch.manual_seed(1234)
    model = S.GPT(S.GPTConfig(**shape, pad_vocab_multiple=v.pad))
    stamps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="slm-bench-train-") as out_dir:
        cfg = S.TrainConfig(batch_size=batch_size, block_size=shape["block_size"], grad_accum_steps=1,
                            max_steps=warmup + steps + 1, warmup_steps=1, eval_interval=10**9,
                            eval_tokens=shape["block_size"], device=str(device), dtype=v.dtype, compile=v.compile,
                            cuda_graphs=v.cuda_graphs, out_dir=out_dir)

        def callback(step, history):
            common.sync(device)
            stamps.append(time.perf_counter())

        S.train(model, data_dir, cfg, callback=callback)
    durations = np.diff(stamps)[warmup:]  # the step between two callbacks, everything train() does included
    return {"variant": v.describe(), **common.summarize_times(list(durations))}


def run(args, device: torch.device) -> dict:
    quick = args.quick
    shape = SHAPES[args.shape]
    if args.batch_size:
        batch = args.batch_size
    elif device.type == "cuda":
        batch = S.preset("t4")[1].batch_size  # the micro-batch the GPU preset trains with
    else:
        batch = 8 if quick else S.preset("seed")[1].batch_size  # the seed's micro-batch, 32
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    rounds = args.steps if args.steps is not None else (3 if quick else 6)
    steps_per_round = 1 if device.type == "cpu" else 3
    levers = device.type == "cuda" or args.levers
    variants = default_variants(device, levers, args.grid_dtypes, args.grid_compile)
    if args.skip_compile:
        variants = [v for v in variants if not v.compile]
    tokens_per_step = batch * shape["block_size"]
    common.log(f"[train] device {device}, shape {args.shape}, batch {batch} x {shape['block_size']}, "
               f"{len(variants)} contenders, {warmup} warm-up + {rounds * steps_per_round} timed steps each")

    data_dir = Path(common.bench_tmpdir("train-data"))
    try:
        return _measure(args, device, shape, batch, warmup, rounds, steps_per_round, variants, tokens_per_step, data_dir)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _measure(args, device, shape, batch, warmup, rounds, steps_per_round, variants, tokens_per_step, data_dir) -> dict:
    quick = args.quick
    S.prepare_data("shakespeare", data_dir)
    peak = common.device_peak(device, quick)
    equivalence = check_reference_equivalence(shape)

    contenders = {v.name: Contender(v, shape, data_dir, batch, device) for v in variants}
    ours_name = variants[1].name
    fpt = common.flops_per_token(contenders[ours_name].model, shape["block_size"])
    times = common.interleaved({n: c.step for n, c in contenders.items()}, device, warmup, rounds,
                               steps_per_round, log=common.log)

    rows = []
    ref_rate = None
    for v in variants:
        st = common.summarize_times(times[v.name])
        rate = tokens_per_step / st["median_s"]
        if v.impl == "reference":
            ref_rate = rate
        rows.append({"name": v.name, "config": v.describe(), "tokens_per_s": rate, "step_ms": st["median_s"] * 1e3,
                     "step_ms_q1": st["q1_s"] * 1e3, "step_ms_q3": st["q3_s"] * 1e3, "timed_steps": st["n"],
                     "mfu": rate * fpt / (peak["tflops"] * 1e12), "variant": dataclasses.asdict(v)})
    for r in rows:
        r["vs_reference"] = r["tokens_per_s"] / ref_rate
    ours_rate = next(r["tokens_per_s"] for r in rows if r["name"] == ours_name)
    for r in rows:
        r["vs_slm_utils"] = r["tokens_per_s"] / ours_rate

    # Evaluation cost: forward-only rate of our default model, against its training rate.
    ours = contenders[ours_name]
    fwd_fn = ours.eval_forward_fn(data_dir)
    for _ in range(max(1, warmup)):
        fwd_fn()
    fwd_times = [common.time_call(fwd_fn, device) for _ in range(max(3, rounds))]
    fwd_rate = tokens_per_step / statistics.median(fwd_times)
    eval_cost = eval_fractions(ours_rate, fwd_rate)
    del contenders
    if device.type == "cuda":
        torch.cuda.empty_cache()

    loop = None
    if not args.skip_train_loop:
        common.log("[train] slm_utils.train() itself, timed through its callback")
        loop_steps = max(2, rounds)
        loop = train_loop_check(variants[1], shape, data_dir, batch, device, warmup, loop_steps)
        loop["tokens_per_s"] = tokens_per_step / loop["median_s"]
        loop["vs_mirrored_step"] = loop["tokens_per_s"] / ours_rate
        rows.append({"name": "slm_utils.train() (not interleaved)", "config": loop["variant"],
                     "tokens_per_s": loop["tokens_per_s"], "step_ms": loop["median_s"] * 1e3,
                     "step_ms_q1": loop["q1_s"] * 1e3, "step_ms_q3": loop["q3_s"] * 1e3,
                     "timed_steps": loop["n"], "mfu": loop["tokens_per_s"] * fpt / (peak["tflops"] * 1e12),
                     "vs_reference": loop["tokens_per_s"] / ref_rate, "vs_slm_utils": loop["vs_mirrored_step"]})

    t4 = None
    if device.type == "cuda":
        best = max((r for r in rows if r.get("variant", {}).get("impl") == "slm"), key=lambda r: r["tokens_per_s"])
        ratio = common.T4_PEAK_TFLOPS / peak["tflops"]
        t4 = {"estimate": True, "from": best["name"], "measured_tokens_per_s": best["tokens_per_s"],
              "peak_ratio": ratio, "t4_tokens_per_s_estimate": best["tokens_per_s"] * ratio,
              "baseline_tokens_per_s_estimate": ours_rate * ratio,
              "formula": f"measured tokens/s x (T4 {common.T4_PEAK_TFLOPS:g} TFLOPS / {peak['tflops']:g} TFLOPS)"}

    goals = []
    if device.type == "cpu":
        goals.append(common.goal_row("CPU: slm_utils at least the reference's speed",
                                     f"{ours_rate / ref_rate:.2f}x", ">= 1.0x", ours_rate >= ref_rate))
    else:
        best_rate = max(r["tokens_per_s"] for r in rows if r.get("variant", {}).get("impl") == "slm")
        goals.append(common.goal_row("GPU: beat the reference by a wide margin", f"{best_rate / ref_rate:.2f}x (best lever set)",
                                     "wide margin (say >= 2x)", best_rate >= 2 * ref_rate))
        goals.append(common.goal_row("T4 estimate (derived, not measured)", f"{t4['t4_tokens_per_s_estimate']:,.0f} tok/s",
                                     ">= 50,000 tok/s", t4["t4_tokens_per_s_estimate"] >= 50_000))
    goals.append(common.goal_row("evaluation share of compute (ours vs seed)",
                                 f"{eval_cost['t4_preset']['fraction']:.1%} vs {eval_cost['seed']['fraction']:.1%}",
                                 "much below the seed's ~39%", eval_cost["t4_preset"]["fraction"] < 0.1))

    result = {
        "section": "train",
        "settings": {"shape": args.shape, **shape, "batch_size": batch, "tokens_per_step": tokens_per_step,
                     "warmup_steps": warmup, "timed_steps": rounds * steps_per_round, "interleaved": True,
                     "device": str(device)},
        "flops_per_token": fpt, "flops_formula": common.FLOPS_FORMULA, "peak": peak,
        "reference_equivalence": equivalence, "rows": rows, "eval_cost": eval_cost,
        "eval_forward_tokens_per_s": fwd_rate, "train_loop_check": loop, "t4_estimate": t4, "goals": goals,
    }
    result["markdown"] = markdown(result)
    return result


def eval_fractions(train_rate: float, fwd_rate: float) -> dict:
    """Share of all compute spent evaluating, for the seed's schedule and for our presets."""

    def frac(train_tokens, eval_tokens):
        t_train, t_eval = train_tokens / train_rate, eval_tokens / fwd_rate
        return {"train_tokens": train_tokens, "eval_tokens": eval_tokens, "fraction": t_eval / (t_train + t_eval),
                "fraction_flop_model": (eval_tokens / 3) / (train_tokens + eval_tokens / 3)}

    seed_train = SEED_EVAL["interval_micro_steps"] * SEED_EVAL["batch_tokens"]
    seed_eval = SEED_EVAL["batches"] * SEED_EVAL["splits"] * SEED_EVAL["batch_tokens"]
    out = {"seed": {"schedule": "every 500 micro-steps of 32x128 tokens: 500 random batches x 2 splits",
                    **frac(seed_train, seed_eval)}}
    for name in ("t4", "seed"):
        _, cfg = S.preset(name)
        key = "t4_preset" if name == "t4" else "seed_preset"
        out[key] = {"schedule": f"slm_utils preset '{name}': every {cfg.eval_interval} optimizer steps of "
                                f"{cfg.tokens_per_step:,} tokens: {cfg.eval_tokens:,} fixed val tokens",
                    **frac(cfg.eval_interval * cfg.tokens_per_step, cfg.eval_tokens)}
    out["method"] = ("fraction = eval time / (train time + eval time) per evaluation cycle, from the measured "
                     "training tokens/s (forward + backward + optimizer step) and forward-only tokens/s in eval "
                     "mode; fraction_flop_model assumes a forward costs 1/3 of a training step (2N vs 6N).")
    out["train_tokens_per_s"], out["forward_tokens_per_s"] = train_rate, fwd_rate
    return out


def markdown(res: dict) -> str:
    cols = [("name", "contender"), ("config", "configuration"), ("tokens_per_s", "tokens/s"),
            ("step_ms", "ms/step (median)"), ("mfu", "MFU"), ("vs_reference", "x reference")]
    rows = [{**r, "mfu": f"{r['mfu']:.1%}"} for r in res["rows"]]
    s = res["settings"]
    out = [f"Training throughput, {s['shape']} shape ({s['n_layer']}/{s['n_head']}/{s['n_embd']}, vocab {s['vocab_size']:,}), "
           f"batch {s['batch_size']} x {s['block_size']} on {s['device']}; {s['warmup_steps']} warm-up + "
           f"{s['timed_steps']} timed steps each, interleaved.",
           f"FLOPs/token {res['flops_per_token'] / 1e6:.1f}M; peak {res['peak']['tflops']:.3g} TFLOP/s "
           f"({res['peak']['source']}).", "", common.markdown_table(rows, cols), ""]
    e = res["eval_cost"]
    erows = [{"schedule": v["schedule"], "fraction": f"{v['fraction']:.1%}", "flop": f"{v['fraction_flop_model']:.1%}"}
             for k, v in e.items() if isinstance(v, dict)]
    out += ["Evaluation share of compute (measured forward-only rate "
            f"{res['eval_forward_tokens_per_s']:,.0f} tok/s vs training {e['train_tokens_per_s']:,.0f} tok/s):", "",
            common.markdown_table(erows, [("schedule", "schedule"), ("fraction", "share (measured rates)"),
                                          ("flop", "share (FLOP model)")]), ""]
    if res.get("t4_estimate"):
        t = res["t4_estimate"]
        out += [f"Derived T4 estimate (an estimate, not a measurement): {t['t4_tokens_per_s_estimate']:,.0f} tok/s "
                f"from '{t['from']}' = {t['formula']}; without compile/levers: {t['baseline_tokens_per_s_estimate']:,.0f} tok/s.", ""]
    eq = res["reference_equivalence"]
    out += [f"Reference check: same parameters ({eq['parameters_slm_utils']:,} vs {eq['parameters_reference']:,}), "
            f"max |logit difference| {eq['max_abs_logit_diff']:.2e} with copied weights.", ""]
    out += [common.markdown_table(res["goals"], common.GOAL_COLUMNS)]
    return "\n".join(out)
