"""Run the notebook's cells as one plain Python script, for a machine without Jupyter.

    python bench/notebook_as_script.py --preset t4 --max-steps 300 --out-dir /tmp/nb

CI executes the notebook with nbval on a CPU, so the cells' GPU branches never run there. A GPU
machine often has PyTorch but no Jupyter; this runs the code cells in order (the Colab-only cells,
marked NBVAL_SKIP, left out) with the parameters cell overridden, matplotlib drawing to files, and,
if IPython is missing, a small stand-in for ``IPython.display`` that prints instead of rendering.
Each cell announces itself with the seconds elapsed, so a failure names its cell. Exit status:
the script's. ``bench/gpu_check.sh`` runs it with the "t4" preset.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DISPLAY_STAND_IN = '''
class _Shown:
    def __init__(self, data=None, *args, **kwargs):
        self.data = data if data is not None else kwargs.get("filename", "")

    def __repr__(self):
        return f"<{type(self).__name__}: {len(str(self.data))} characters>"


class HTML(_Shown):
    pass


class Code(_Shown):
    pass


class Image(_Shown):
    pass


class Markdown(_Shown):
    def __repr__(self):
        return str(self.data)


def display(*objects, **kwargs):
    for obj in objects:
        print(repr(obj))
'''

IPYTHON_STAND_IN = '''
version_info = (9, 0, 0)  # matplotlib asks; any recent version will do


def get_ipython():  # not inside IPython
    return None
'''


def build_script(notebook: Path, overrides: dict) -> str:
    nb = json.loads(notebook.read_text())
    lines = ["import matplotlib", "matplotlib.use('Agg')", "import time as _time", "_T0 = _time.perf_counter()"]
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if "# NBVAL_SKIP" in source:
            continue
        lines.append(f"print('\\n#### cell {i} at %.1f s' % (_time.perf_counter() - _T0), flush=True)")
        lines.append(source)
        if "parameters" in cell["metadata"].get("tags", []):
            lines += [f"{name} = {value!r}" for name, value in overrides.items()]
    lines.append("print('\\n#### all cells ran in %.1f s' % (_time.perf_counter() - _T0), flush=True)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--notebook", type=Path, default=REPO / "SLM_movie_scripts.ipynb")
    p.add_argument("--preset", default="t4")
    p.add_argument("--data-source", default="shakespeare")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--out-dir", type=Path, required=True, help="figures, checkpoints, token files")
    p.add_argument("--stand-in", action="store_true", help="use the IPython stand-in even where IPython is installed")
    args = p.parse_args(argv)

    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "bench").exists():  # the notebook reads bench/projection.json and bench/ablation.json from its folder
        (out / "bench").symlink_to(REPO / "bench", target_is_directory=True)
    overrides = {"PRESET": args.preset, "DATA_SOURCE": args.data_source, "MAX_STEPS": args.max_steps,
                 "RESUME": False, "OUT_DIR": str(out / "outputs"), "DATA_DIR": str(out / "data")}
    with tempfile.TemporaryDirectory(prefix="slm-notebook-") as tmp:
        script = Path(tmp) / "notebook.py"
        script.write_text(build_script(args.notebook, overrides))
        paths = [str(REPO)]
        if args.stand_in or importlib.util.find_spec("IPython") is None:
            shim = Path(tmp) / "IPython"
            shim.mkdir()
            (shim / "__init__.py").write_text(IPYTHON_STAND_IN)
            (shim / "display.py").write_text(DISPLAY_STAND_IN)
            paths.insert(0, tmp)
        env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        env.pop("SLM_SMOKE", None)
        env.pop("CI", None)  # the point is the full code path of the preset, not the smoke switch
        return subprocess.run([sys.executable, str(script)], cwd=out, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
