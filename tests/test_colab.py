"""The notebook on Colab from a cold start: one repository address, and a setup cell that either
provides slm_utils.py or stops Run all with one clear message."""

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BADGE = re.compile(r"colab\.research\.google\.com/github/([^/\s]+/[^/\s]+)/blob/main/SLM_movie_scripts\.ipynb")


def notebook_cells() -> list[str]:
    return ["".join(c["source"]) for c in json.loads((ROOT / "SLM_movie_scripts.ipynb").read_text())["cells"]]


def setup_cell() -> str:
    (cell,) = [c for c in notebook_cells() if "REPO_URL = " in c]
    return cell


def test_badges_and_repo_url_name_one_repository():
    """Each file names the repository once; the badges and REPO_URL agree."""
    cells = notebook_cells()
    notebook_badges = [m for c in cells for m in BADGE.findall(c)]
    readme_badges = BADGE.findall((ROOT / "README.md").read_text())
    (repo_url,) = re.findall(r'^REPO_URL = "https://github\.com/([^"]+)"', setup_cell(), flags=re.M)
    assert len(notebook_badges) == 1 and len(readme_badges) == 1
    assert notebook_badges[0] == readme_badges[0] == repo_url


@pytest.fixture
def fake_colab(monkeypatch, tmp_path):
    """A working folder without slm_utils.py, ``google.colab`` importable, and no process started."""
    uploads = []
    files = types.SimpleNamespace(upload=lambda: uploads.pop(0)() if uploads else {})
    colab = types.ModuleType("google.colab")
    colab.files = files
    google = types.ModuleType("google")
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.chdir(tmp_path)
    return types.SimpleNamespace(uploads=uploads, calls=calls, folder=tmp_path)


def run_setup_cell():
    exec(compile(setup_cell(), "setup cell", "exec"), {"__name__": "__main__"})


def test_setup_cell_stops_run_all_when_slm_utils_cannot_be_had(fake_colab, capsys):
    with pytest.raises(ModuleNotFoundError, match="slm_utils.py is missing.*Fix: set REPO_URL"):
        run_setup_cell()
    assert "Choose slm_utils.py" in capsys.readouterr().out  # the upload box was offered first
    assert not any("clone" in cmd for cmd in fake_colab.calls)  # a placeholder address is never cloned


def test_setup_cell_accepts_an_uploaded_slm_utils(fake_colab):
    def upload():
        (fake_colab.folder / "slm_utils.py").write_text("# uploaded\n")
        return {"slm_utils.py": b"# uploaded\n"}

    fake_colab.uploads.append(upload)
    run_setup_cell()  # no error: the notebook goes on
    assert (fake_colab.folder / "slm_utils.py").is_file()
