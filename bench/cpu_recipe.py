"""One full run of the "cpu" preset, with overrides, on the embedded corpus: the val curve and time.

    python bench/cpu_recipe.py --out /tmp/run.json                                   # the preset
    python bench/cpu_recipe.py --out /tmp/old.json --set arch=gpt2 --set tie_weights=False ...
    python bench/cpu_recipe.py --out /tmp/speed.json --compare-old 30    # tokens/s, new against old
    python bench/cpu_recipe.py --out /tmp/fused.json --compare-old 30 --old loss_chunk=1024   # or any change

This is how the "cpu" preset's recipe was chosen at its real shape (GPT-2 vocabulary, 800 steps):
each candidate is ``slm_utils.preset("cpu", **overrides)`` trained by ``slm_utils.train`` from
the same seed, evaluated every 100 steps on the same fixed validation windows, against the
bigram baseline of ``slm_utils.baseline_losses``. Values of ``--set`` are Python literals.

``--compare-old N`` trains nothing to the end: it times N optimizer steps (``slm_utils.train_step``)
of the preset and of the preset's old recipe (``common.OLD_RECIPE``: GPT-2 blocks, tied head, AdamW, no curriculum),
interleaved step by step so both see the same machine, and reports the median tokens/s of each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

import slm_utils as S



def compare_old(data_dir, steps: int, other: dict | None = None) -> dict:
    """Median tokens/s of the preset ("new") and of ``other`` overrides of it ("old"; default
    common.OLD_RECIPE), timed step by step in turn, each step through slm_utils.train_step."""
    runs = {}
    for name, over in (("new", {}), ("old", common.OLD_RECIPE if other is None else other)):
        model_cfg, cfg = S.preset("cpu", **over)
        torch.manual_seed(cfg.seed)
        model = S.GPT(model_cfg)
        runs[name] = (model, S.configure_optimizer(model, cfg, "cpu"), cfg, [])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps + 2):
        for model, opt, cfg, times in runs.values():
            batch = [S.get_batch(data_dir, "train", cfg.batch_size, cfg.block_size, "cpu", gen)]
            t0 = time.perf_counter()
            S.train_step(model, opt, scaler, batch, grad_clip=cfg.grad_clip, loss_chunk=cfg.loss_chunk,
                         dtype=S._resolve_dtype(cfg, torch.device("cpu")))  # as train() would: dtype= counts
            times.append(cfg.tokens_per_step / (time.perf_counter() - t0))
    rates = {name: sorted(r[3][2:])[steps // 2] for name, r in runs.items()}  # median, warm-up dropped
    return {"tokens_per_s": rates, "new_over_old": rates["new"] / rates["old"], "steps": steps,
            "old": common.OLD_RECIPE if other is None else other}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a preset override")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compare-old", type=int, default=0, metavar="N", help="only time N steps, new against old")
    p.add_argument("--old", action="append", default=None, metavar="FIELD=VALUE",
                   help="with --compare-old: the preset with these overrides stands for 'old'")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = S.parse_overrides(args.set)  # the command line's own parser: literals, bare words stay strings
    work = Path(tempfile.mkdtemp(prefix="slm-cpu-recipe-"))
    S.prepare_data("shakespeare", work / "data")
    if args.compare_old:
        other = S.parse_overrides(args.old) if args.old else None
        result = {"machine": common.machine_info(torch.device("cpu")),
                  **compare_old(work / "data", args.compare_old, other)}
        common.write_json(args.out, result)
        print(f"tokens/s: new {result['tokens_per_s']['new']:,.0f}, old {result['tokens_per_s']['old']:,.0f} "
              f"(new / old = {result['new_over_old']:.2f})")
        return 0
    baselines = S.baseline_losses(work / "data")
    model_cfg, cfg = S.preset("cpu", out_dir=str(work / "out"), **overrides)
    torch.manual_seed(cfg.seed)
    model = S.GPT(model_cfg)
    t0 = time.perf_counter()
    history = S.train(model, work / "data", cfg)
    result = {"machine": common.machine_info(torch.device("cpu")), "command": "python bench/cpu_recipe.py " +
              " ".join(sys.argv[1:] if argv is None else argv), "overrides": overrides, "baselines": baselines,
              "val_step": history["val_step"], "val_loss": history["val_loss"],
              "below_bigram": baselines["bigram"] - history["val_loss"][-1],
              "train_seconds": time.perf_counter() - t0, "tokens_per_s": history["tokens_per_s"]}
    common.write_json(args.out, result)
    print(f"val {history['val_loss'][-1]:.3f} ({result['below_bigram']:+.3f} below the bigram {baselines['bigram']:.3f}) "
          f"in {result['train_seconds']:.0f} s at {history['tokens_per_s']:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
