"""The benchmark: one command, a table on stdout, JSON on disk.

    python bench/run.py                       # everything, full size (about 30 minutes on 2 CPU cores)
    python bench/run.py --quick               # everything, small sizes (a few minutes)
    python bench/run.py --only data,generate  # some sections
    python bench/run.py --out bench/results   # where the JSON goes (the default)

Sections (see BENCHMARKS.md for what each measures and why):
  data      tokenization throughput and peak memory: slm_utils.prepare_data vs the seed's datasets.map
  train     training tokens/s and MFU: slm_utils vs a plain reference GPT; the GPU levers
  generate  generation tokens/s with and without the KV cache
  quality   the "t4" recipe vs the "seed" recipe at equal token budgets (several seeds, a plot)

Writes ``OUT/<section>.json`` per section run, then ``OUT/summary.json`` and ``OUT/summary.md``
built from every section file present in OUT (each keeps its own machine and date), and prints
the Markdown tables, ready to paste into BENCHMARKS.md. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository root on sys.path)

SECTIONS = ("data", "train", "generate", "quality")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: every section in a minute or a few")
    p.add_argument("--only", type=_csv, default=list(SECTIONS), help="comma-separated sections: " + ",".join(SECTIONS))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="folder for the JSON")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (training section)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("train")
    g.add_argument("--shape", choices=("seed", "tiny"), default="seed", help="model shape; 'tiny' only checks the code")
    g.add_argument("--batch-size", type=int, default=None, help="windows per step (default 32; 8 with --quick on CPU)")
    g.add_argument("--warmup", type=int, default=None, help="untimed steps per contender")
    g.add_argument("--steps", type=int, default=None, help="timed rounds per contender")
    g.add_argument("--levers", action="store_true", help="also run the lever rows on a CPU (always on with CUDA)")
    g.add_argument("--grid-dtypes", type=_csv, default=[], help="e.g. float16,bfloat16: also time these autocast dtypes")
    g.add_argument("--grid-compile", type=lambda s: [x == "on" for x in _csv(s)], default=[False],
                   help="with --grid-dtypes: off, on or off,on")
    g.add_argument("--skip-train-loop", action="store_true", help="skip the slm_utils.train() row")
    g.add_argument("--skip-compile", action="store_true", help="drop the torch.compile rows (slow to warm up on a CPU)")
    g = p.add_argument_group("data")
    g.add_argument("--data-mb", type=float, default=None, help="size of the repeated corpus (default 200; 20 with --quick)")
    g.add_argument("--workers", type=int, default=None, help="tokenizer workers (default: all cores)")
    g = p.add_argument_group("generate")
    g.add_argument("--new-tokens", type=int, default=512)
    g.add_argument("--gen-block-sizes", default="128,512",
                   help="model block sizes to time: 128 is the trained context, 512 the seed's model config")
    g.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; 1 with --quick)")
    g.add_argument("--skip-reference-generate", action="store_true", help="skip the plain reference's generation")
    g = p.add_argument_group("quality")
    g.add_argument("--quality-seeds", type=int, default=None, help="seeds per recipe (default 3; 2 with --quick)")
    g.add_argument("--quality-seed-steps", type=int, default=None,
                   help="optimizer steps of the scaled seed recipe; the t4 recipe takes 8x as many (default 128; 32 with --quick)")
    g.add_argument("--quality-workers", type=int, default=None,
                   help="training runs at a time, each with cores / workers threads (default: one per core)")
    args = p.parse_args(argv)
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def run_section(name: str, args, device) -> dict:
    if name == "data":
        import bench_data as mod
    elif name == "train":
        import bench_train as mod
    elif name == "generate":
        import bench_generate as mod
    else:
        import bench_quality as mod
    t0 = time.perf_counter()
    result = mod.run(args, device)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["quick"] = bool(args.quick)
    result["command"] = "python bench/run.py " + " ".join(sys.argv[1:])
    return result


def build_summary(out: Path) -> tuple[dict, str]:
    sections, parts = {}, []
    for name in SECTIONS:
        path = out / f"{name}.json"
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        sections[name] = {"machine": res["machine"], "quick": res.get("quick"), "seconds": res.get("seconds"),
                          "command": res.get("command"), "goals": res.get("goals", [])}
        mode = "quick mode" if res.get("quick") else "full mode"
        parts.append(f"### {name} ({mode}, {res.get('seconds')} s)\n\nMachine: {common.machine_line(res['machine'])}  \n"
                     f"Command: `{res.get('command')}`\n\n{res['markdown']}\n")
    goals = [{"section": n, **g} for n, s in sections.items() for g in s["goals"]]
    md = "\n".join(parts)
    if goals:
        md += "\n### goals\n\n" + common.markdown_table(goals, [("section", "section")] + common.GOAL_COLUMNS) + "\n"
    return {"sections": sections, "goals": goals}, md


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in [s for s in SECTIONS if s in args.only]:
        common.log(f"== section {name} ({'quick' if args.quick else 'full'}) ==")
        machine = common.machine_info(device)
        result = run_section(name, args, device)
        result["machine"] = machine
        result["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
        common.write_json(args.out / f"{name}.json", result)
        print(f"\n### {name}\n\n{result['markdown']}\n", flush=True)
    summary, md = build_summary(args.out)
    summary["machine"] = common.machine_info(device)
    common.write_json(args.out / "summary.json", summary)
    (args.out / "summary.md").write_text(md)
    if summary["goals"]:
        print("### goals\n\n" + common.markdown_table(summary["goals"], [("section", "section")] + common.GOAL_COLUMNS))
    common.log(f"wrote {args.out}/<section>.json, summary.json and summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
