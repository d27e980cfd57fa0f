"""Reliability: exact resume, crash-safe checkpoints, guarded training, and bad inputs.

Colab disconnects, files get cut short and people type odd values. These tests check that a
training run survives interruption bit for bit, that a crash during a save never costs the
previous checkpoint, that a non-finite loss never reaches the weights, and that every bad input
meets a specific exception whose message names the problem and the fix, with nothing half-written.
"""

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import slm_utils as s

REPO = Path(__file__).resolve().parents[1]

# ---- shared settings ---------------------------------------------------------------------

# dropout > 0 so that a resume which forgot the RNG states would draw different masks
RESUME_MODEL = dict(vocab_size=50257, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
RESUME_TRAIN = dict(learning_rate=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=12, batch_size=4,
                    block_size=16, eval_interval=4, eval_tokens=256, eval_batch_size=16, patience=100,
                    device="cpu", dtype="float32", seed=7)
STOP_AT = 6  # after the checkpoint at step 4, before the one at step 8
# Exact resume must hold for each architecture bundle and optimizer: (model, training) overrides.
# The Llama variant also has GQA, an untied head and a sequence-length curriculum spanning the stop.
RESUME_VARIANTS = {
    "gpt2-adamw": ({}, {}),
    "llama-muon": (dict(s.arch_fields("llama"), n_kv_head=1, tie_weights=False),
                   dict(optimizer="muon", curriculum_steps=8, curriculum_start=4)),
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: a second thread gains nothing, and on a busy 2-core machine its
    spin-waits triple the CPU time. The killed subprocess below uses the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def resume_cfg(out_dir, variant: str = "gpt2-adamw") -> s.TrainConfig:
    return s.TrainConfig(**RESUME_TRAIN, **RESUME_VARIANTS[variant][1], out_dir=str(out_dir))


def variant_model(variant: str, init_seed: int = 0) -> s.GPT:
    return fresh_model(init_seed, **RESUME_VARIANTS[variant][0])


def fresh_model(init_seed: int = 0, **overrides) -> s.GPT:
    torch.manual_seed(init_seed)
    return s.GPT(s.GPTConfig(**{**RESUME_MODEL, **overrides}))


def small_model(**overrides) -> s.GPT:
    """A model with a 256-token vocabulary: checkpoints of a few hundred KB, saved in milliseconds."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return s.GPT(s.GPTConfig(**{**cfg, **overrides}))


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ in {different}"


def assert_all_finite(model):
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"non-finite weights in {bad}"


def ckpt_files(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []


# ---- 1. exact resume -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(RESUME_VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference_run(variant, shakespeare_dir, tmp_path_factory):
    """One uninterrupted run of 12 optimizer steps: the history and final weights to match."""
    model = variant_model(variant)
    history = s.train(model, shakespeare_dir, resume_cfg(tmp_path_factory.mktemp("reference"), variant))
    assert len(history["train_loss"]) == RESUME_TRAIN["max_steps"]
    return history, weights(model)


def assert_matches_reference(reference, history, model):
    ref_history, ref_weights = reference
    assert history["step"] == list(range(1, RESUME_TRAIN["max_steps"] + 1))
    assert history["train_loss"] == ref_history["train_loss"]  # exact float equality, step by step
    assert history["lr"] == ref_history["lr"]
    assert history["val_step"] == ref_history["val_step"]
    assert history["val_loss"] == ref_history["val_loss"]
    assert history["best_val_loss"] == ref_history["best_val_loss"]
    assert_same_weights(weights(model), ref_weights)


def test_resume_after_a_stop_is_exact(variant, reference_run, shakespeare_dir, tmp_path):
    out = tmp_path / "out"
    first = s.train(variant_model(variant), shakespeare_dir, resume_cfg(out, variant),
                    callback=lambda step, h: step == STOP_AT)
    assert first["stopped"] == f"stopped by callback at step {STOP_AT}"
    assert len(first["train_loss"]) == STOP_AT
    assert s.load_checkpoint(out / "last.pt")["step"] == STOP_AT  # the stop itself saved a checkpoint

    # differently initialised on purpose: every weight must come from the checkpoint
    model = variant_model(variant, init_seed=123)
    history = s.train(model, shakespeare_dir, resume_cfg(out, variant), resume=True)
    assert_matches_reference(reference_run, history, model)


KILLED_RUN = """
import sys, time
from pathlib import Path
import torch
import slm_utils as s

torch.set_num_threads({threads})  # same reduction order as the process that resumes
marker = Path({marker!r})

def pause_after_stop_step(step, history):
    if step == {stop_at}:
        marker.write_text(str(step))
        time.sleep(600)  # the test kills us here, between two checkpoints

torch.manual_seed(0)
model = s.GPT(s.GPTConfig(**{model!r}))
s.train(model, {data!r}, s.TrainConfig(**{train!r}, out_dir={out!r}), callback=pause_after_stop_step)
sys.exit("the test should have killed this process")
"""


def test_resume_after_sigkill_is_exact(variant, reference_run, shakespeare_dir, tmp_path):
    out, marker, script = tmp_path / "out", tmp_path / "reached_stop_step", tmp_path / "killed_run.py"
    model_kw, train_kw = RESUME_VARIANTS[variant]
    script.write_text(KILLED_RUN.format(threads=torch.get_num_threads(), marker=str(marker), stop_at=STOP_AT,
                                        model={**RESUME_MODEL, **model_kw}, data=str(shakespeare_dir),
                                        train={**RESUME_TRAIN, **train_kw}, out=str(out)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log_path = tmp_path / "killed_run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not marker.exists():
                assert proc.poll() is None, f"the run ended early:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "the run never reached the stop step"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # the kill came after step 6, so the newest checkpoint is the one from step 4
    eval_every = RESUME_TRAIN["eval_interval"]
    saved = s.load_checkpoint(out / "last.pt")
    assert saved["step"] == STOP_AT // eval_every * eval_every
    assert len(saved["history"]["train_loss"]) == saved["step"]
    assert not list(out.glob("*.tmp")), "a save was in flight although the kill came between saves"

    model = variant_model(variant, init_seed=321)
    history = s.train(model, shakespeare_dir, resume_cfg(out, variant), resume=True)
    assert_matches_reference(reference_run, history, model)


def test_resume_without_a_checkpoint_starts_from_scratch(shakespeare_dir, tmp_path):
    cfg = s.TrainConfig(**{**RESUME_TRAIN, "max_steps": 3, "warmup_steps": 1}, out_dir=str(tmp_path / "new"))
    history = s.train(fresh_model(), shakespeare_dir, cfg, resume=True)
    assert history["step"] == [1, 2, 3]


def test_resuming_a_run_that_stopped_early_changes_nothing(shakespeare_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(s, "estimate_loss", lambda *args, **kwargs: 5.0)  # val loss never improves
    cfg = s.TrainConfig(**{**RESUME_TRAIN, "eval_interval": 2, "patience": 2}, out_dir=str(tmp_path / "out"))
    first = s.train(fresh_model(), shakespeare_dir, cfg)
    assert first["step"][-1] == 6 and first["stopped"].startswith("early stop")
    before = (tmp_path / "out" / "last.pt").read_bytes()
    again = s.train(fresh_model(), shakespeare_dir, cfg, resume=True)
    assert again["step"][-1] == 6 and again["train_loss"] == first["train_loss"]
    assert (tmp_path / "out" / "last.pt").read_bytes() == before


# ---- 2. crash-safe checkpoints -----------------------------------------------------------------


class SimulatedCrash(OSError):
    pass


def _raise_crash(*args, **kwargs):
    raise SimulatedCrash("simulated crash during save")


class HalfWritingFile:
    """A file object that writes half of what it is given, then fails (a full disk, a lost mount)."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(bytes(data)[: len(data) // 2])
        self.f.flush()
        raise SimulatedCrash(28, "No space left on device (simulated)")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _half_writing_open(path, mode="r", *args, **kwargs):
    f = open(path, mode, *args, **kwargs)
    return HalfWritingFile(f) if "w" in mode else f


@pytest.mark.parametrize("crash", ["mid-write", "before-fsync", "before-rename"])
def test_a_crash_during_save_keeps_the_previous_checkpoint(crash, tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    old = small_model()
    s.save_checkpoint(path, old, step=1)
    old_bytes = path.read_bytes()

    new = small_model()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    if crash == "mid-write":
        monkeypatch.setattr(s, "open", _half_writing_open, raising=False)  # the module's own open()
    elif crash == "before-fsync":
        monkeypatch.setattr(s.os, "fsync", _raise_crash)
    else:
        monkeypatch.setattr(s.os, "replace", _raise_crash)
    with pytest.raises(SimulatedCrash):
        s.save_checkpoint(path, new, step=2)
    monkeypatch.undo()

    assert path.read_bytes() == old_bytes  # the final name still holds the whole old file
    loaded = s.load_checkpoint(path)
    assert loaded["step"] == 1
    assert_same_weights(weights(loaded["gpt"]), weights(old))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no stray temporary file

    s.save_checkpoint(path, new, step=2)  # the next save works
    assert s.load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


KILLED_SAVE = """
import os, signal
import torch
import slm_utils as s

torch.manual_seed(0)
model = s.GPT(s.GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
s.save_checkpoint({path!r}, model, step=1)
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)

def die(*args):  # the new file is written, not yet renamed: the worst moment to lose power
    os.kill(os.getpid(), signal.SIGKILL)

s.os.replace = die
s.save_checkpoint({path!r}, model, step=2)
"""


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE.format(path=str(path)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    assert (tmp_path / "last.pt.tmp").is_file()  # killed with the new file written but not renamed
    loaded = s.load_checkpoint(path)
    assert loaded["step"] == 1
    assert_same_weights(weights(loaded["gpt"]), weights(small_model()))


def test_a_crash_in_a_training_save_keeps_the_last_good_checkpoint(shakespeare_dir, tmp_path, monkeypatch):
    """The second evaluation's save dies inside train(): last.pt from the first one still resumes."""
    cfg = s.TrainConfig(**{**RESUME_TRAIN, "max_steps": 8, "eval_interval": 2}, out_dir=str(tmp_path / "out"))
    real_replace, renames = os.replace, []

    def replace_then_crash(src, dst):
        if str(dst).endswith(".pt") and len(renames) >= 2:  # best.pt and last.pt at step 2, then crash
            raise SimulatedCrash("simulated crash during save")
        renames.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(s.os, "replace", replace_then_crash)
    with pytest.raises(SimulatedCrash):
        s.train(fresh_model(), shakespeare_dir, cfg)
    monkeypatch.undo()
    assert renames == ["best.pt", "last.pt"]
    saved = s.load_checkpoint(tmp_path / "out" / "last.pt")
    assert saved["step"] == 2
    history = s.train(fresh_model(init_seed=5), shakespeare_dir, cfg, resume=True)
    assert history["step"] == list(range(1, 9))


# ---- corrupt files ------------------------------------------------------------------------------


@pytest.fixture
def good_checkpoint(tmp_path) -> Path:
    return s.save_checkpoint(tmp_path / "good.pt", small_model(), step=3,
                             data_meta={"source": "test", "vocab_size": 256, "tokenizer": "test"})


def _corrupt(kind: str, good: Path, target: Path):
    blob = good.read_bytes()
    if kind == "truncated":
        target.write_bytes(blob[: len(blob) * 2 // 3])
    elif kind == "cut_inside_header":
        target.write_bytes(blob[:20])
    elif kind == "flipped_bytes":
        mid = len(blob) // 2
        target.write_bytes(blob[:mid] + bytes(b ^ 0xFF for b in blob[mid:mid + 16]) + blob[mid + 16:])
    elif kind == "random_bytes":
        target.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "text_file":
        target.write_text("this is a README, not a checkpoint\n")
    elif kind == "plain_torch_save":  # e.g. a checkpoint from another project
        torch.save({"model": small_model().state_dict()}, target)
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "missing":
        pass
    elif kind == "directory":
        target.mkdir()
    else:
        raise AssertionError(kind)


CORRUPTIONS = ["truncated", "cut_inside_header", "flipped_bytes", "random_bytes", "text_file",
               "plain_torch_save", "empty", "missing", "directory"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_broken_checkpoint_is_a_clear_error(kind, good_checkpoint, tmp_path):
    target = tmp_path / "broken.pt"
    _corrupt(kind, good_checkpoint, target)
    with pytest.raises(s.CheckpointError) as err:
        s.load_checkpoint(target)
    msg = str(err.value)
    assert str(target) in msg and "Fix:" in msg
    # a clear error, not a chained unpickling / zip traceback
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__


@pytest.mark.parametrize("kind", ["truncated", "flipped_bytes"])
def test_a_broken_checkpoint_refuses_to_resume(kind, good_checkpoint, shakespeare_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _corrupt(kind, good_checkpoint, out / "last.pt")
    before = (out / "last.pt").read_bytes()
    with pytest.raises(s.CheckpointError, match="corrupt or truncated"):
        s.train(fresh_model(), shakespeare_dir, resume_cfg(out), resume=True)
    assert (out / "last.pt").read_bytes() == before and ckpt_files(out) == ["last.pt"]


def _checkpoint_with_payload(path: Path, payload) -> Path:
    """A file with the right magic and a valid checksum around an arbitrary payload."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    path.write_bytes(s._CKPT_MAGIC + hashlib.sha256(body).digest() + body)
    return path


def test_an_unreadable_payload_with_a_valid_checksum_is_a_clear_error(tmp_path):
    body = b"not a torch file at all" * 10
    path = tmp_path / "odd.pt"
    path.write_bytes(s._CKPT_MAGIC + hashlib.sha256(body).digest() + body)
    with pytest.raises(s.CheckpointError, match="could not be unpacked"):
        s.load_checkpoint(path)


def test_a_payload_missing_fields_is_a_clear_error(tmp_path):
    path = _checkpoint_with_payload(tmp_path / "partial.pt", {"model": small_model().state_dict(), "step": 3})
    with pytest.raises(s.CheckpointError, match="model_config"):
        s.load_checkpoint(path)


# ---- config / vocab mismatch -------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("n_layer", 3), ("n_embd", 64), ("block_size", 32), ("vocab_size", 300)])
def test_a_checkpoint_from_a_different_model_names_the_field(field, value, good_checkpoint):
    other = small_model(**{field: value})
    before = weights(other)
    with pytest.raises(s.CheckpointError) as err:
        s.load_checkpoint(good_checkpoint, other)
    msg = str(err.value)
    assert field in msg and "Fix:" in msg and "model=None" in msg
    assert_same_weights(weights(other), before)  # nothing half-loaded into the model
    assert s.load_checkpoint(good_checkpoint)["gpt"].config.n_layer == 2  # the suggested fix works


def test_a_checkpoint_for_another_vocabulary_is_refused(good_checkpoint):
    with pytest.raises(s.CheckpointError, match=r"vocabulary of 256 tokens but the data has 100.*Fix:"):
        s.load_checkpoint(good_checkpoint, small_model(), data_meta={"vocab_size": 100})
    # the same data vocabulary loads fine
    s.load_checkpoint(good_checkpoint, small_model(), data_meta={"vocab_size": 256})


def test_resuming_on_data_with_another_vocabulary_is_refused(shakespeare_dir, tmp_path):
    """last.pt was trained on GPT-2 ids; the data folder now says it was made with a 32,000-token vocab."""
    meta = s.read_meta(shakespeare_dir)
    other_data = tmp_path / "other_data"
    other_data.mkdir()
    for name in ("train.bin", "val.bin"):
        (other_data / name).symlink_to(shakespeare_dir / name)
    (other_data / "meta.json").write_text(json.dumps({**meta, "vocab_size": 32000}))
    out = tmp_path / "out"
    s.save_checkpoint(out / "last.pt", fresh_model(), step=4, data_meta=meta)
    before = (out / "last.pt").read_bytes()
    with pytest.raises(s.CheckpointError, match=r"vocabulary of 50257 tokens but the data has 32000"):
        s.train(fresh_model(), other_data, resume_cfg(out), resume=True)
    assert (out / "last.pt").read_bytes() == before and ckpt_files(out) == ["last.pt"]


# ---- 3. guarded training -------------------------------------------------------------------------


def inject_bad_steps(model: s.GPT, bad_calls, kind: str) -> dict:
    """Make training forward passes number ``bad_calls`` (1-based) non-finite.

    ``nan_loss`` / ``inf_loss`` multiply the loss, so the gradients are non-finite too and
    would poison the weights if they reached the optimizer. ``inf_grad`` keeps the loss finite
    and turns one parameter's gradient into inf/nan. Evaluation passes are left alone. Also
    records, for every bad call, whether the weights at the next training call were unchanged.
    """
    original_forward = model.forward
    param = model.transformer.wpe.weight
    state = {"calls": 0, "bad_now": False, "snapshot": None, "unchanged_after_bad": []}

    def grad_hook(grad):
        return grad * float("inf") if state["bad_now"] else grad

    param.register_hook(grad_hook)

    def forward(idx, targets=None, **kwargs):
        if model.training and targets is not None:
            state["calls"] += 1
            if state["snapshot"] is not None:  # the previous call was bad: did anything move?
                state["unchanged_after_bad"].append(all(
                    torch.equal(a, b) for a, b in zip(state["snapshot"], model.parameters())))
                state["snapshot"] = None
            state["bad_now"] = state["calls"] in bad_calls
            if state["bad_now"]:
                state["snapshot"] = [p.detach().clone() for p in model.parameters()]
        else:
            state["bad_now"] = False
        logits, loss = original_forward(idx, targets, **kwargs)
        if state["bad_now"] and kind in ("nan_loss", "inf_loss"):
            loss = loss * float("nan" if kind == "nan_loss" else "inf")
        return logits, loss

    model.forward = forward
    return state


def guard_cfg(out_dir, **overrides) -> s.TrainConfig:
    base = {**RESUME_TRAIN, "max_steps": 6, "eval_interval": 2, "max_bad_steps": 3}
    return s.TrainConfig(**{**base, **overrides}, out_dir=str(out_dir))


def test_fp16_overflow_steps_are_skipped_by_the_scaler_and_counted(shakespeare_dir, tmp_path):
    """float16 with GradScaler (here on the CPU): an inf gradient makes the scaler skip the update,
    halve its scale and go on; the skip is counted and no weight moves."""
    model = fresh_model()
    bad_calls = {2, 4}
    state = inject_bad_steps(model, bad_calls, "inf_grad")
    history = s.train(model, shakespeare_dir, guard_cfg(tmp_path / "out", dtype="float16"))
    assert history["step"] == [1, 2, 3, 4, 5, 6]
    assert state["calls"] == 6  # the scaler skips inside the step: no retry on a fresh batch
    assert history["skipped_steps"] >= len(bad_calls)  # ours, plus any genuine fp16 overflow
    assert history["bad_steps"] == 0  # the loss itself stayed finite
    assert state["unchanged_after_bad"] == [True] * len(bad_calls)
    assert all(np.isfinite(history["train_loss"])) and all(np.isfinite(history["val_loss"]))
    assert_all_finite(model)
    scaler_state = s.load_checkpoint(tmp_path / "out" / "last.pt")["scaler"]
    assert scaler_state["scale"] < 65536.0  # the scale came down after the overflows


@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "inf_grad"])
def test_isolated_bad_steps_are_skipped_and_counted(kind, shakespeare_dir, tmp_path):
    model = fresh_model()
    bad_calls = {2, 4, 5}  # never 3 in a row
    state = inject_bad_steps(model, bad_calls, kind)
    finite_after_every_step = []
    history = s.train(model, shakespeare_dir, guard_cfg(tmp_path / "out"),
                      callback=lambda step, h: finite_after_every_step.append(
                          all(torch.isfinite(p).all() for p in model.parameters())))
    assert state["calls"] == 6 + len(bad_calls)  # each skipped step is retried on a fresh batch
    assert history["bad_steps"] == len(bad_calls)
    assert history["step"] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(history["train_loss"])) and all(np.isfinite(history["val_loss"]))
    assert finite_after_every_step == [True] * 6
    assert state["unchanged_after_bad"] == [True] * len(bad_calls)  # a bad step moves no weight
    assert_all_finite(model)
    assert s.load_checkpoint(tmp_path / "out" / "last.pt")["history"]["bad_steps"] == len(bad_calls)


def test_too_many_bad_steps_in_a_row_stop_training(shakespeare_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    saved = {}  # file name -> (bytes, step) of the last save
    real_save = s.save_checkpoint

    def recording_save(path, *args, **kwargs):
        result = real_save(path, *args, **kwargs)
        for target in [path, *kwargs.get("copies", ())]:
            saved[Path(target).name] = (Path(target).read_bytes(), kwargs["step"])
        return result

    monkeypatch.setattr(s, "save_checkpoint", recording_save)
    model = fresh_model()
    state = inject_bad_steps(model, set(range(5, 100)), "nan_loss")  # steps 1-4 fine, then only NaN
    seen = {}
    with pytest.raises(s.TrainingDivergedError) as err:
        s.train(model, shakespeare_dir, guard_cfg(out, max_steps=12), callback=lambda step, h: seen.update(h=h))
    msg = str(err.value)
    assert "3 optimizer steps in a row" in msg and "non-finite" in msg
    assert str(out / "best.pt") in msg and "Fix:" in msg and "learning_rate" in msg
    assert state["calls"] == 4 + 3
    assert seen["h"]["bad_steps"] == 3 and seen["h"]["step"][-1] == 4
    assert state["unchanged_after_bad"] == [True, True]  # the third bad call raised before a next call
    assert_all_finite(model)

    # best.pt is exactly what the last good evaluation wrote, and loads
    best_bytes, best_step = saved["best.pt"]
    assert best_step in (2, 4)
    assert (out / "best.pt").read_bytes() == best_bytes
    best = s.load_checkpoint(out / "best.pt")
    assert best["step"] == best_step
    assert_all_finite(best["gpt"])
    assert ckpt_files(out) == ["best.pt", "last.pt"]


# ---- 5. the catalogue of bad inputs ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """A prepared corpus of three short scripts: a few hundred tokens of train, one script of val."""
    scripts = tmp_path_factory.mktemp("scripts")
    line = "INT. KITCHEN - NIGHT\nANNA\nWhere were you?\nBEN\nOut. Walking. Thinking about the sea.\n"
    for i in range(3):
        (scripts / f"script_{i}.txt").write_text(line * (10 + 5 * i))
    data_dir = tmp_path_factory.mktemp("small_data")
    s.prepare_data(scripts, data_dir, num_workers=1)
    return data_dir


def _copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_empty_prompt_is_refused():
    model = small_model()
    with pytest.raises(s.ConfigError, match=r"prompt is empty.*Fix:.*50256"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)


def test_a_prompt_longer_than_block_size_is_cropped_with_a_warning():
    model = small_model()  # block_size 16
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"20 tokens, more than block_size=16"):
        out = model.generate(prompt, max_new_tokens=5, temperature=0)
    assert out.shape == (1, 25) and torch.equal(out[:, :20], prompt)
    # the model saw only the most recent tokens: greedy from the cropped prompt gives the same continuation
    start = s.context_start(20, 16)
    assert 0 < start <= 20 - 16 // 2
    cropped = model.generate(prompt[:, start:], max_new_tokens=5, temperature=0)
    assert torch.equal(out[:, 20:], cropped[:, -5:])


@pytest.mark.parametrize("kwargs,names", [
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(top_k=0), "top_k=0"),
    (dict(top_k=257), "top_k=257"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_p=-0.1), "top_p=-0.1"),
    (dict(max_new_tokens=-1), "max_new_tokens=-1"),
])
def test_meaningless_sampling_settings_are_refused(kwargs, names):
    model = small_model()
    args = {"max_new_tokens": 3, **kwargs}
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(s.ConfigError) as err:
        model.generate(prompt, **args)
    msg = str(err.value)
    assert names in msg and "must be" in msg  # names the setting and what it must be
    assert model.training  # the mode is untouched


def test_sampling_settings_at_their_limits_are_accepted():
    model = small_model()
    prompt = torch.tensor([[1, 2, 3]])
    assert model.generate(prompt, max_new_tokens=0).shape == (1, 3)
    out = model.generate(prompt, max_new_tokens=2, temperature=0.0, top_k=256, top_p=1.0)
    assert out.shape == (1, 5)
    assert model.generate(prompt, max_new_tokens=2, top_k=1).shape == (1, 5)


def test_an_unknown_preset_lists_the_real_ones():
    with pytest.raises(s.ConfigError) as err:
        s.preset("gpu")
    msg = str(err.value)
    assert "'gpu'" in msg and "Fix:" in msg and all(repr(p) in msg for p in s.PRESETS)
    with pytest.raises(s.ConfigError, match=r"Unknown override.*n_layers.*Fix:"):
        s.preset("smoke", n_layers=3)


def test_a_training_block_size_larger_than_the_model_is_refused(small_data, tmp_path):
    out = tmp_path / "out"
    model = small_model(vocab_size=50257)  # block_size 16
    cfg = s.TrainConfig(max_steps=2, warmup_steps=0, batch_size=2, block_size=32, eval_tokens=64, out_dir=str(out))
    with pytest.raises(s.ConfigError, match=r"block_size=32 is larger than the model's block_size=16.*Fix:"):
        s.train(model, small_data, cfg)
    assert not out.exists()


def test_a_batch_larger_than_the_split_allows_is_refused(small_data, tmp_path):
    n_train = s.read_meta(small_data)["splits"]["train"]["tokens"]
    out = tmp_path / "out"
    cfg = s.TrainConfig(max_steps=2, warmup_steps=0, batch_size=n_train, block_size=16, eval_tokens=64,
                        out_dir=str(out))
    with pytest.raises(s.ConfigError, match=r"batch_size=.*distinct windows.*Fix: lower batch_size"):
        s.train(small_model(vocab_size=50257), small_data, cfg)
    assert not out.exists()


def test_a_block_size_as_long_as_the_split_is_refused(small_data, tmp_path):
    n_train = s.read_meta(small_data)["splits"]["train"]["tokens"]
    out = tmp_path / "out"
    model = small_model(vocab_size=50257, block_size=n_train + 8)
    cfg = s.TrainConfig(max_steps=2, warmup_steps=0, batch_size=1, block_size=n_train, eval_tokens=64,
                        out_dir=str(out))
    with pytest.raises(s.DataError, match=r"not smaller than the train split.*Fix:"):
        s.train(model, small_data, cfg)
    assert not out.exists()


def test_a_model_vocabulary_smaller_than_the_data_is_refused(small_data, tmp_path):
    out = tmp_path / "out"
    cfg = s.TrainConfig(max_steps=2, warmup_steps=0, batch_size=2, block_size=16, eval_tokens=64, out_dir=str(out))
    with pytest.raises(s.ConfigError, match=r"50257 token ids.*vocab_size=256.*Fix: GPTConfig\(vocab_size=50257\)"):
        s.train(small_model(), small_data, cfg)
    assert not out.exists()


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_an_out_dir_that_cannot_be_written_is_refused(where, small_data, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a regular file")
    out = blocker / "checkpoints" if where == "under_a_file" else blocker
    cfg = s.TrainConfig(max_steps=2, warmup_steps=0, batch_size=2, block_size=16, eval_tokens=64, out_dir=str(out))
    with pytest.raises(s.ConfigError) as err:
        s.train(small_model(vocab_size=50257), small_data, cfg)
    msg = str(err.value)
    assert "Cannot write checkpoints" in msg and str(out) in msg and "Fix:" in msg
    assert blocker.read_text() == "a regular file"


@pytest.mark.parametrize("damage,expected", [
    ("odd_bytes", r"not a whole number of 2-byte tokens.*Fix: prepare_data\(\.\.\., force=True\)"),
    ("extra_token", r"tokens but meta.json says.*do not belong together.*Fix:"),
    ("cut_short", r"tokens but meta.json says.*Fix:"),
    ("meta_disagrees", r"tokens but meta.json says.*Fix:"),
])
@pytest.mark.parametrize("split", ["train", "val"])
def test_token_files_that_disagree_with_meta_are_refused(damage, expected, split, small_data, tmp_path):
    data = _copy_data(small_data, tmp_path / "data")
    bin_path = data / f"{split}.bin"
    if damage == "odd_bytes":
        with open(bin_path, "ab") as f:
            f.write(b"\x00")
    elif damage == "extra_token":
        with open(bin_path, "ab") as f:
            f.write(b"\x00\x00")
    elif damage == "cut_short":
        bin_path.write_bytes(bin_path.read_bytes()[:-20])
    else:
        meta = json.loads((data / "meta.json").read_text())
        meta["splits"][split]["tokens"] += 1000
        (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(s.DataError, match=expected):
        s.read_meta(data)
    with pytest.raises(s.DataError, match=re.escape(str(bin_path))):
        s.get_batch(data, split, 2, 8)
    out = tmp_path / "out"
    cfg = s.TrainConfig(max_steps=2, warmup_steps=0, batch_size=2, block_size=8, eval_tokens=64, out_dir=str(out))
    with pytest.raises(s.DataError, match=expected):
        s.train(small_model(vocab_size=50257), data, cfg)
    assert not out.exists()
