"""bench/notebook_as_script.py turns the notebook into one script for GPU machines without Jupyter."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("notebook_as_script", REPO / "bench" / "notebook_as_script.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_is_the_notebook_with_its_parameters_overridden():
    tool = load_tool()
    script = tool.build_script(REPO / "SLM_movie_scripts.ipynb", {"PRESET": "t4", "MAX_STEPS": 300})
    compile(script, "notebook.py", "exec")  # valid Python as a whole
    assert "# NBVAL_SKIP" not in script  # the Colab-only cells stay out
    assert "drive.mount" not in script
    default, override = script.index('PRESET = None'), script.index("PRESET = 't4'")
    # the override follows the parameters cell and comes before the cell that reads it
    assert default < override < script.index("slm_utils.preset(PRESET, **OVERRIDES)")
    assert "MAX_STEPS = 300" in script
    cells = json.loads((REPO / "SLM_movie_scripts.ipynb").read_text())["cells"]
    kept = [c for c in cells if c["cell_type"] == "code" and "# NBVAL_SKIP" not in "".join(c["source"])]
    assert script.count("#### cell ") == len(kept) > 20  # every other code cell, each announced


def test_the_display_stand_in_has_every_name_the_notebook_imports():
    """On a GPU machine without IPython the script runs against a stand-in; a name the notebook
    imports from IPython.display and the stand-in lacks stops the script at that cell."""
    import re

    tool = load_tool()
    script = tool.build_script(REPO / "SLM_movie_scripts.ipynb", {})
    wanted = {name.strip() for line in re.findall(r"^\s*from IPython\.display import (.+)$", script, re.M)
              for name in line.split(",")}
    assert wanted  # the notebook does import from it
    stand_in = {}
    exec(tool.DISPLAY_STAND_IN, stand_in)
    assert wanted <= set(stand_in), f"missing from the stand-in: {sorted(wanted - set(stand_in))}"
