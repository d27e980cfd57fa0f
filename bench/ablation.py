"""Ablation: which of the architecture and optimizer options learn more per token and per second.

Start from the GPT-2 design trained with AdamW, change one thing at a time, then combine the
changes that helped. Every recipe gets its own learning-rate sweep, so no option wins by its lr:

1. sweep: each recipe at lr multipliers 0.5x, 1x, 2x (every lr of the recipe scaled alike),
   seed 0;
2. seeds: the best multiplier (lowest final val loss) again with seeds 1 and 2;
3. timing: each recipe's training step timed alone on one thread, the machine otherwise quiet
   (runs in phases 1-2 go two at a time, so their own clocks share the cores).

Reported per recipe: final val loss at equal tokens (mean and spread over the 3 seeds), val loss at
equal wall time on this CPU (each recipe's val curve read at the tokens its measured speed
reaches in that time), and the tokens each needs to
reach the bigram baseline and a harder target. Plot: ``--plot`` (default bench/ablation.png).
Equal wall time is the time the fastest recipe takes for the whole token budget; a slower recipe
is read at the tokens it has trained on by then.

The corpus is the embedded Shakespeare with its vocabulary cut to the 4,095 ids most frequent in
the training split plus one id for all the others (94% of the training tokens keep their own id).
Without the cut a 128-wide model spends most of its time in the 50,257-way output layer, and 60-odd
runs would take hours on two cores. The task is therefore a little easier than the real one, and
its losses compare between recipes here, not with other tables. The baselines are
``slm_utils.baseline_losses`` of this corpus.

    python bench/ablation.py --out bench/ablation.json                 # full: about 45 min, 2 cores
    python bench/ablation.py --quick --out /tmp/ablation.json           # code path check: 1-2 min

A run's results are kept in the JSON as they finish; rerunning with the same --out skips them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import torch
from bench_quality import crossing

import slm_utils as S

# The ablation shape: narrow enough that 50 runs fit a CPU, deep enough that the blocks matter.
MODEL = dict(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
BASE_TRAIN = dict(learning_rate=2e-3, min_lr=2e-4, muon_lr=0.02, batch_size=16, block_size=64, grad_accum_steps=1,
                  weight_decay=0.1, grad_clip=1.0, eval_batch_size=128, patience=10**6, dtype="float32",
                  device="cpu", compile=False)
LR_FIELDS = ("learning_rate", "min_lr", "muon_lr", "embedding_lr")  # scaled together by a multiplier
MULTIPLIERS = (0.5, 1.0, 2.0)
SEEDS = (0, 1, 2)

# One change each from "base"; "combined" is filled in from the winners unless given with --combined.
CHANGES = {
    "base": {},
    "rope": dict(pos_emb="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "gqa": dict(n_kv_head=2),
    "no_bias": dict(bias=False),
    "untied": dict(tie_weights=False),
    "embedding_lr": dict(embedding_lr=2e-2),
    "muon": dict(optimizer="muon"),
    "curriculum": dict(curriculum_steps=-4),  # negative: that fraction of the steps, 1/4, set per run
    # not a single change: the recipe the "cpu" and "t4" presets use, measured beside the others
    "presets": dict(S.arch_fields("llama"), tie_weights=False, optimizer="muon", embedding_lr=2e-2),
}
# Muon's Newton-Schulz precision (fp32 on a CPU by default): the same update in the dtypes a GPU
# would use, bf16 (torch.optim.Muon, sm80+) and fp16 (a T4). Run at muon's best lr, 3 seeds.
PRECISION_VARIANTS = {
    "muon_ns_bf16": ("muon", dict(optimizer="muon", muon_ns_dtype="bfloat16")),
    "muon_ns_fp16": ("muon", dict(optimizer="muon", muon_ns_dtype="float16")),
}


VOCAB = 4096  # the 4,095 most frequent training ids keep their own id; every other id becomes id 4,095


def recipe_configs(changes: dict, multiplier: float, seed: int, steps: int, vocab: int, eval_tokens: int,
                   out_dir: str) -> tuple[S.GPTConfig, S.TrainConfig]:
    model_fields = {f.name for f in dataclasses.fields(S.GPTConfig)}
    changes = dict(changes)
    if changes.get("curriculum_steps", 0) < 0:
        changes["curriculum_steps"] = steps // -changes["curriculum_steps"]
        changes.setdefault("curriculum_start", MODEL["block_size"] // 4)
    m = S.GPTConfig(vocab_size=vocab, **{**MODEL, **{k: v for k, v in changes.items() if k in model_fields}})
    train_kw = {**BASE_TRAIN, **{k: v for k, v in changes.items() if k not in model_fields}}
    for k in LR_FIELDS:
        if train_kw.get(k) is not None:
            train_kw[k] *= multiplier
    t = S.TrainConfig(**train_kw, max_steps=steps, warmup_steps=max(1, steps // 20), eval_interval=max(1, steps // 12),
                      eval_tokens=eval_tokens, seed=seed, out_dir=out_dir)
    return m, t


def run_one(spec: dict) -> dict:
    """One training run in a worker process on one thread; returns its val curve."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out_dir:
        m, t = recipe_configs(spec["changes"], spec["multiplier"], spec["seed"], spec["steps"], spec["vocab"],
                              spec["eval_tokens"], out_dir)
        torch.manual_seed(t.seed)
        model = S.GPT(m)
        x, y = S.get_eval_windows(spec["data_dir"], t.block_size, t.eval_tokens)
        init = S.estimate_loss(model, x, y, t.eval_batch_size)
        t0 = time.perf_counter()
        h = S.train(model, spec["data_dir"], t)
        seconds = time.perf_counter() - t0
    spec = {k: v for k, v in spec.items() if k != "data_dir"}  # a temporary folder: not worth keeping
    return {**spec, "tokens": [0] + h["val_tokens"], "val": [init] + h["val_loss"], "seconds": seconds,
            "params": S.count_parameters(model)["total"], "tokens_per_step": t.tokens_per_step}


def time_recipe(changes: dict, data_dir: str, vocab: int, steps: int = 30) -> float:
    """Median seconds per optimizer step of a recipe on one thread, by slm_utils.train_step."""
    torch.set_num_threads(1)
    m, t = recipe_configs(changes, 1.0, 0, 1000, vocab, 4096, "unused")
    torch.manual_seed(0)
    model = S.GPT(m)
    opt = S.configure_optimizer(model, t, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps):
        # the curriculum's short windows are timed at the stage mix of the real run
        bs, T = S.window_at(step * t.max_steps // steps, t)
        batch = [S.get_batch(data_dir, "train", bs, T, "cpu", gen)]
        t0 = time.perf_counter()
        S.train_step(model, opt, scaler, batch, grad_clip=t.grad_clip)
        times.append(time.perf_counter() - t0)
    return statistics.mean(sorted(times[2:])[: max(1, (steps - 2) * 3 // 4)])  # drop warm-up and the slowest


def interp(xs: list[float], ys: list[float], x: float) -> float:
    return float(np.interp(x, xs, ys))


def summarize(runs: list[dict], timings: dict, baselines: dict, harder: float) -> dict:
    names = list(dict.fromkeys(r["recipe"] for r in runs))
    out = {}
    for name in names:
        sweep = {r["multiplier"]: r["val"][-1] for r in runs if r["recipe"] == name and r["seed"] == 0}
        best_m = min(sweep, key=sweep.get)
        seeds = [r for r in runs if r["recipe"] == name and r["multiplier"] == best_m]
        finals = [r["val"][-1] for r in seeds]
        tokens = seeds[0]["tokens"]
        mean_curve = [statistics.mean(r["val"][i] for r in seeds) for i in range(len(tokens))]
        reach = {}
        for label, target in (("bigram", baselines["bigram"]), ("harder", harder)):
            per_seed = [crossing(r["tokens"], r["val"], target) for r in seeds]
            reach[label] = statistics.mean(per_seed) if all(v is not None for v in per_seed) else None
            reach[label + "_per_seed"] = per_seed
        out[name] = {"sweep": sweep, "best_multiplier": best_m, "seeds": [r["seed"] for r in seeds],
                     "final": finals, "final_mean": statistics.mean(finals),
                     "final_spread": (max(finals) - min(finals)) / 2 if len(finals) > 1 else 0.0,
                     "tokens": tokens, "mean_curve": mean_curve, "reach": reach,
                     "s_per_step": timings.get(name), "tokens_per_step": seeds[0]["tokens_per_step"],
                     "changes": seeds[0]["changes"], "params": seeds[0]["params"]}
    # equal wall time: the time the fastest recipe needs for the whole budget, so every curve reaches it
    budget = min(s["tokens"][-1] / s["tokens_per_step"] * s["s_per_step"] for s in out.values())
    for s in out.values():
        reached = budget / s["s_per_step"] * s["tokens_per_step"]
        s["tokens_per_s"] = s["tokens_per_step"] / s["s_per_step"]
        s["tokens_at_equal_time"] = min(reached, s["tokens"][-1])
        s["val_at_equal_time"] = interp(s["tokens"], s["mean_curve"], s["tokens_at_equal_time"])
        s["equal_time_beyond_budget"] = reached > s["tokens"][-1]
    return {"recipes": out, "equal_time_s": budget}


def pick_combined(summary: dict) -> dict:
    """Every single change whose 3-seed mean beats the base's by more than the two spreads."""
    base = summary["base"]
    combined = {}
    for name, s in summary.items():
        if name in ("base", "combined", "presets") or name in PRECISION_VARIANTS:
            continue
        if s["final_mean"] < base["final_mean"] - (s["final_spread"] + base["final_spread"]):
            combined.update(s["changes"])
    return combined


def markdown(res: dict) -> str:
    rec, b = res["summary"]["recipes"], res["baselines"]
    base = rec["base"]
    lines = [
        f"Ablation shape: {MODEL['n_layer']} layers, {MODEL['n_head']} heads, {MODEL['n_embd']} wide, window "
        f"{MODEL['block_size']}, vocabulary cut to {res['vocab']:,} ids ({res['kept_share']:.1%} of the training tokens "
        f"keep their own id); {res['budget_tokens']:,} tokens per run "
        f"({res['steps']} steps of {base['tokens_per_step']:,}); val loss on {res['eval_tokens']:,} fixed tokens. "
        f"Baselines on this corpus: uniform {b['uniform']:.3f}, unigram {b['unigram']:.3f}, bigram "
        f"{b['bigram']:.3f}; harder target {res['harder_target']:.3f}. Equal wall time = "
        f"{res['summary']['equal_time_s']:.0f} s on one thread.",
        "",
        "| recipe | change from base | lr sweep (x0.5 / x1 / x2, seed 0) | final val, 3 seeds | vs base | "
        "tok/s (1 thread) | val at equal time | tokens to bigram | tokens to harder |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in rec.items():
        sweep = " / ".join(f"{s['sweep'][m]:.3f}" + ("*" if m == s["best_multiplier"] else "") for m in sorted(s["sweep"]))
        change = ", ".join(f"{k}={v}" for k, v in s["changes"].items()) or "GPT-2, AdamW"
        reach = [f"{s['reach'][k] / 1e3:,.0f}K" if s["reach"][k] is not None else "not reached"
                 for k in ("bigram", "harder")]
        lines.append(f"| {name} | {change} | {sweep} | {s['final_mean']:.3f} ± {s['final_spread']:.3f} | "
                     f"{s['final_mean'] - base['final_mean']:+.3f} | {s['tokens_per_s']:,.0f} | "
                     f"{s['val_at_equal_time']:.3f}{' (budget ends first)' if s['equal_time_beyond_budget'] else ''} | "
                     f"{reach[0]} | {reach[1]} |")
    lines += ["", "± is half the range over the seeds; * marks the multiplier the seeds ran at."]
    for name in ("combined", "presets"):
        if name not in rec:
            continue
        c = rec[name]
        t = crossing(c["tokens"], c["mean_curve"], base["final_mean"])
        share = f"{t:,.0f} tokens = {t / base['tokens'][-1]:.0%} of the base's" if t is not None else "not reached"
        lines += ["", f"The {name} recipe reaches the base recipe's final val loss ({base['final_mean']:.3f}) after "
                      f"{share} (mean curves, linear between evaluations)."]
        res[f"{name}_share_of_base_tokens"] = t / base["tokens"][-1] if t is not None else None
    return "\n".join(lines)


def plot(res: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec, b = res["summary"]["recipes"], res["baselines"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for name, s in rec.items():
        style = (dict(lw=2.5, color="black") if name in ("base", "combined") else
                 dict(lw=2.5, color="crimson") if name == "presets" else dict(lw=1, alpha=0.8))
        ax.plot(np.array(s["tokens"][1:]) / 1e3, s["mean_curve"][1:], label=name,
                linestyle="--" if name == "base" else "-", **style)
    for label, y, c in (("bigram", b["bigram"], "gray"), ("harder target", res["harder_target"], "silver")):
        ax.axhline(y, color=c, linestyle=":", label=f"{label} ({y:.2f})")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("val loss, mean of 3 seeds")
    ax.set_ylim(top=min(7.5, max(s["mean_curve"][1] for s in rec.values())))
    ax.set_title("val loss against tokens")
    ax.legend(fontsize=7, ncol=2)
    names = list(rec)
    means = [rec[n]["final_mean"] for n in names]
    bx.barh(names, means, xerr=[rec[n]["final_spread"] for n in names], color=["C0"] * len(names))
    bx.axvline(rec["base"]["final_mean"], color="black", linestyle="--", lw=1)
    bx.set_xlim(min(means) - 0.15, max(means) + 0.1)
    bx.invert_yaxis()
    bx.set_xlabel("final val loss (± half range of 3 seeds)")
    bx.set_title("at equal tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file (results kept as runs finish)")
    p.add_argument("--plot", type=Path, default=Path(__file__).with_name("ablation.png"))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 320; quick 24)")
    p.add_argument("--recipes", default=None, help="comma-separated subset of " + ",".join(CHANGES))
    p.add_argument("--combined", default=None, help="JSON of the combined recipe's changes (default: the winners)")
    p.add_argument("--harder", type=float, default=0.25, help="harder target = bigram baseline minus this")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny runs, one seed, to check the code path")
    args = p.parse_args(argv)
    steps = args.steps or (24 if args.quick else 320)
    seeds = SEEDS[:1] if args.quick else SEEDS
    multipliers = (1.0,) if args.quick else MULTIPLIERS
    recipes = {k: CHANGES[k] for k in (args.recipes.split(",") if args.recipes else CHANGES)}
    work = Path(tempfile.mkdtemp(prefix="ablation-"))
    S.prepare_data("shakespeare", work / "full")
    meta = S.cap_vocabulary(work / "full", work / "capped", VOCAB)
    data_dir, vocab = str(work / "capped"), meta["vocab_size"]
    baselines = S.baseline_losses(data_dir)
    eval_tokens = 4096 if args.quick else 8192
    state = json.loads(args.out.read_text()) if args.out.is_file() else {}
    known = {**recipes, **{n: c for n, (_, c) in PRECISION_VARIANTS.items()}}
    done = {(r["recipe"], r["multiplier"], r["seed"]): r for r in state.get("runs", [])
            if r["steps"] == steps and r["changes"] == known.get(r["recipe"], state.get("combined_changes"))}
    res = {"machine": common.machine_info(torch.device("cpu")), "command": "python bench/ablation.py " +
           " ".join(sys.argv[1:] if argv is None else argv), "steps": steps, "vocab": vocab, "eval_tokens": eval_tokens,
           "budget_tokens": steps * BASE_TRAIN["batch_size"] * BASE_TRAIN["block_size"],
           "kept_share": meta["kept_share_train"],
           "baselines": baselines, "harder_target": baselines["bigram"] - args.harder, "runs": list(done.values())}

    def save():  # after every run: an interrupted ablation keeps what it finished
        common.write_json(args.out, res)

    def run_all(specs):
        todo = [sp for sp in specs if (sp["recipe"], sp["multiplier"], sp["seed"]) not in done]
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.workers) as pool:
            for r in pool.imap_unordered(run_one, todo):
                done[(r["recipe"], r["multiplier"], r["seed"])] = r
                res["runs"] = list(done.values())
                save()
                common.log(f"{r['recipe']} x{r['multiplier']} seed {r['seed']}: val {r['val'][-1]:.3f} "
                           f"({r['seconds']:.0f} s)")

    def spec(name, changes, m, seed):
        return dict(recipe=name, changes=changes, multiplier=m, seed=seed, steps=steps, vocab=vocab,
                    eval_tokens=eval_tokens, data_dir=data_dir)

    def sweep_and_seeds(named: dict):
        run_all([spec(n, c, m, 0) for n, c in named.items() for m in multipliers])
        best = {}
        for n in named:
            sweep = {m: done[(n, m, 0)]["val"][-1] for m in multipliers}
            best[n] = min(sweep, key=sweep.get)
        run_all([spec(n, c, best[n], s) for n, c in named.items() for s in seeds[1:]])

    sweep_and_seeds(recipes)
    if not args.quick and "muon" in recipes:
        sweep = {m: done[("muon", m, 0)]["val"][-1] for m in multipliers}
        best_muon = min(sweep, key=sweep.get)
        run_all([spec(n, c, best_muon, sd) for n, (_, c) in PRECISION_VARIANTS.items() for sd in seeds])
    timings = {}
    partial = summarize(res["runs"], {r["recipe"]: 1.0 for r in res["runs"]}, baselines, res["harder_target"])["recipes"]
    combined = json.loads(args.combined) if args.combined else pick_combined(partial)
    if combined:
        res["combined_changes"] = combined
        sweep_and_seeds({"combined": combined})
    variants = {n: c for n, (_, c) in PRECISION_VARIANTS.items() if any(r["recipe"] == n for r in res["runs"])}
    all_recipes = {**recipes, **variants, **({"combined": combined} if combined else {})}
    for name, changes in all_recipes.items():
        timings[name] = time_recipe(changes, data_dir, vocab)
        common.log(f"timing {name}: {timings[name] * 1e3:.0f} ms per step")
    res["timings_s_per_step"] = timings
    res["summary"] = summarize(res["runs"], timings, baselines, res["harder_target"])
    common.write_result(args.out, res, markdown(res))  # before the plot: a plot that fails keeps the figures
    plot(res, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
