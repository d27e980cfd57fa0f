"""The command line (python slm_utils.py ...) and training under torchrun with gloo on the CPU.

Every test starts its own processes and waits for them (or kills them) before it returns.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import slm_utils

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "slm_utils.py")
# a model and run small enough that a process spends most of its time starting
TINY = ["--set", "n_layer=2", "--set", "n_head=2", "--set", "n_embd=32", "--set", "block_size=32",
        "--set", "curriculum_steps=0", "--set", "batch_size=4", "--set", "grad_accum_steps=2",
        "--set", "warmup_steps=2", "--set", "eval_tokens=2048", "--set", "eval_batch_size=16"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # one thread per process: 2 cores


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def torchrun(*args, nproc=2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            SCRIPT, *map(str, args)]


def run_torchrun(*args, nproc=2, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(*args, nproc=nproc), capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=ROOT)


def weights(path) -> dict:
    return slm_utils.load_checkpoint(path)["model"]


def one_line_error(result, code):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Fix:" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# ---- the command line ----------------------------------------------------------------------------


def run_main(capsys, *args) -> tuple[int, str, str]:
    """slm_utils.main in this process (no start-up cost): exit code, stdout, stderr."""
    try:
        code = slm_utils.main([str(a) for a in args])
    except SystemExit as e:  # argparse: --help, and usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_of_every_subcommand_has_examples(capsys):
    for command in ("prepare", "train", "sample", "export"):
        code, out, _ = run_main(capsys, command, "--help")
        assert code == 0 and "examples:" in out and "usage:" in out, command


def test_prepare_train_sample_happy_path(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for i in range(3):
        (scripts / f"play{i}.txt").write_text(("HAMLET\nTo be, or not to be, that is the question.\n\n"
                                               "OPHELIA\nGood my lord, how does your honour?\n\n") * 200)
    data = tmp_path / "data"
    result = cli("prepare", "--source", scripts, "--data-dir", data, "--num-workers", 1)
    assert result.returncode == 0, result.stderr
    assert (data / "train.bin").is_file() and "train" in result.stdout

    out = tmp_path / "run"
    result = cli("train", "--preset", "smoke", "--data-dir", data, "--out-dir", out, "--set", "max_steps=4",
                 "--set", "eval_interval=2", "--set", "eval_tokens=1024")
    assert result.returncode == 0, result.stderr
    assert "step 4/4" in result.stdout  # plain log lines: stdout is not a terminal here
    assert "\r" not in result.stderr  # and no progress bar redraws
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()

    result = cli("sample", "--checkpoint", out / "best.pt", "--prompt", "HAMLET", "--max-new-tokens", 5,
                 "--seed", 1, "--temperature", 0.8, "--top-k", 20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HAMLET") and len(result.stdout) > len("HAMLET\n")
    again = cli("sample", "--checkpoint", out / "best.pt", "--prompt", "HAMLET", "--max-new-tokens", 5,
                "--seed", 1, "--temperature", 0.8, "--top-k", 20)
    assert again.stdout == result.stdout  # --seed makes the text repeatable

    pytest.importorskip("transformers")
    result = cli("export", "--checkpoint", out / "best.pt", "--out-dir", tmp_path / "hf", "--data-dir", data)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file() and "bigram baseline" in (tmp_path / "hf" / "README.md").read_text()
    result = cli("export", "--checkpoint", out / "best.pt", "--out-dir", tmp_path / "hf")
    assert result.returncode == 2 and "--overwrite" in result.stderr  # an existing export is not replaced


@pytest.mark.parametrize("args, code", [
    (["train", "--preset", "gpt5", "--data-dir", "data", "--out-dir", "x"], 2),  # unknown preset
    (["train", "--preset", "smoke", "--data-dir", "data", "--out-dir", "x", "--set", "n_layers=3"], 2),  # unknown field
    (["train", "--preset", "smoke", "--data-dir", "data", "--out-dir", "x", "--set", "n_layer"], 2),  # not field=value
    (["train", "--preset", "smoke", "--data-dir", "no_such_dir", "--out-dir", "x"], 2),  # data not prepared
    (["sample", "--checkpoint", "no_such.pt", "--prompt", "INT. "], 1),  # missing checkpoint
])
def test_bad_input_exits_with_one_line(args, code, tmp_path, capsys):
    args = [str(tmp_path / a) if a in ("x", "no_such.pt", "no_such_dir") else a for a in args]
    got, _, err = run_main(capsys, *args)
    assert got == code and err.count("\n") == 1 and err.startswith("error: ") and "Fix:" in err, (got, err)


def test_corrupt_checkpoint_and_empty_prompt(tmp_path, capsys):
    model = slm_utils.GPT(slm_utils.GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0))
    good = slm_utils.save_checkpoint(tmp_path / "good.pt", model)
    got, _, err = run_main(capsys, "sample", "--checkpoint", good, "--prompt", "")
    assert got == 2 and "prompt is empty" in err and err.count("\n") == 1
    bad = tmp_path / "bad.pt"
    blob = bytearray(good.read_bytes())
    blob[-10] ^= 0xFF  # one flipped byte
    bad.write_bytes(bytes(blob))
    got, _, err = run_main(capsys, "sample", "--checkpoint", bad, "--prompt", "INT. ")
    assert got == 1 and "corrupt" in err and err.count("\n") == 1


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    one_line_error(cli("sample", "--checkpoint", tmp_path / "missing.pt", "--prompt", "INT. "), 1)
    one_line_error(cli("train", "--preset", "gpt5", "--out-dir", tmp_path), 2)
    result = cli("train")  # --preset and --out-dir missing: argparse's own message
    assert result.returncode == 2 and "required" in result.stderr and "Traceback" not in result.stderr


# ---- several processes ----------------------------------------------------------------------------


def test_two_processes_train_like_one(shakespeare_dir, tmp_path):
    """Same global batch (2 micro-batches: one per process, or both in one), same initial weights.

    Tolerance: the weights agree to 5e-4 absolute, and the block matrices to 2e-5. Gradients summed
    in another order differ by rounding; Adam divides each gradient by its own running size, so where
    a gradient is close to zero a rounding difference can become a step of up to the lr. The val
    losses agree to 1e-5.
    """
    args = ["train", "--preset", "cpu", "--data-dir", shakespeare_dir, *TINY, "--set", "max_steps=6",
            "--set", "eval_interval=3"]
    single = cli(*args, "--out-dir", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    double = run_torchrun(*args, "--out-dir", tmp_path / "two")
    assert double.returncode == 0, double.stderr
    assert "2 processes" in double.stdout
    one, two = (slm_utils.load_checkpoint(tmp_path / d / "last.pt") for d in ("one", "two"))
    for name, w in one["model"].items():
        diff = float((w - two["model"][name]).abs().max())
        assert diff <= (2e-5 if ".h." in name else 5e-4), (name, diff)
    assert one["history"]["val_loss"] == pytest.approx(two["history"]["val_loss"], abs=1e-5)
    assert len(two["extra"]["rng_ranks"]) == 2


def test_indivisible_accumulation_is_a_config_error(shakespeare_dir, tmp_path):
    result = run_torchrun("train", "--preset", "cpu", "--data-dir", shakespeare_dir, *TINY,
                          "--set", "grad_accum_steps=3", "--set", "max_steps=4", "--out-dir", tmp_path / "x")
    assert result.returncode != 0
    assert "grad_accum_steps=3 cannot be shared evenly by 2 processes" in result.stderr


def test_sigkill_of_one_rank_then_resume_is_exact(shakespeare_dir, tmp_path):
    args = ["train", "--preset", "cpu", "--data-dir", shakespeare_dir, *TINY, "--set", "max_steps=16",
            "--set", "eval_interval=4"]
    whole = run_torchrun(*args, "--out-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(*args, "--out-dir", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "slm_utils.py" in " ".join(p.cmdline())]
        assert workers, "no worker processes found"
        workers[-1].kill()  # SIGKILL one rank mid-run
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    step = slm_utils.load_checkpoint(out / "last.pt")["step"]
    assert 0 < step < 16, step  # the kill really came mid-run

    resumed = run_torchrun(*args, "--out-dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(tmp_path / "whole" / "last.pt"), weights(out / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
