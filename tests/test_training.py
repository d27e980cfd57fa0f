"""Training: the lr schedule, precision choice, optimizer groups, gradient accumulation,
checkpoints, presets, a smoke run on the embedded corpus, and the loss plot."""

import dataclasses
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in tests

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from helpers import take_steps  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import slm_utils  # noqa: E402
from slm_utils import (  # noqa: E402
    GPT,
    PRESETS,
    ConfigError,
    GPTConfig,
    TrainConfig,
    choose_amp_dtype,
    configure_optimizer,
    estimate_loss,
    get_eval_windows,
    get_lr,
    load_checkpoint,
    load_model,
    preset,
    save_checkpoint,
    scale_schedule,
    train,
)


def tiny_model(seed=0, vocab_size=50257, dropout=0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def tokens(shape, vocab_size, seed):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# ---- learning-rate schedule ----------------------------------------------------------------

SCHEDULE = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=111)


def test_lr_starts_nonzero_below_peak():
    assert 0 < get_lr(0, SCHEDULE) < SCHEDULE.learning_rate


def test_lr_peaks_at_end_of_warmup():
    assert get_lr(SCHEDULE.warmup_steps, SCHEDULE) == pytest.approx(SCHEDULE.learning_rate, rel=1e-12)


def test_lr_middle_of_cosine_is_halfway():
    middle = SCHEDULE.warmup_steps + (SCHEDULE.max_steps - 1 - SCHEDULE.warmup_steps) // 2  # step 60
    expected = (SCHEDULE.learning_rate + SCHEDULE.min_lr) / 2
    assert get_lr(middle, SCHEDULE) == pytest.approx(expected, rel=1e-9)


def test_lr_ends_at_min_lr():
    assert get_lr(SCHEDULE.max_steps - 1, SCHEDULE) == pytest.approx(SCHEDULE.min_lr, rel=1e-9)


def test_lr_is_monotone_in_each_phase():
    lrs = [get_lr(s, SCHEDULE) for s in range(SCHEDULE.max_steps)]
    warmup, decay = lrs[: SCHEDULE.warmup_steps + 1], lrs[SCHEDULE.warmup_steps:]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))
    assert all(a > b for a, b in zip(decay, decay[1:]))
    peak = SCHEDULE.learning_rate * (1 + 1e-12)  # float rounding
    assert all(0 < lr <= peak for lr in warmup) and all(SCHEDULE.min_lr <= lr <= peak for lr in decay)


def test_lr_without_warmup_starts_at_peak():
    cfg = TrainConfig(learning_rate=3e-4, min_lr=3e-5, warmup_steps=0, max_steps=50)
    assert get_lr(0, cfg) == pytest.approx(3e-4)
    assert get_lr(49, cfg) == pytest.approx(3e-5)


@pytest.mark.parametrize("steps", [300, 1234, 2500, 5000, 20000])
def test_scale_schedule_keeps_the_shares_of_warmup_and_evaluation(steps):
    _, full = preset("t4")
    short = scale_schedule(full, steps)
    assert short.max_steps == steps
    assert short.warmup_steps / steps == pytest.approx(full.warmup_steps / full.max_steps, abs=1 / steps)
    assert steps / short.eval_interval == pytest.approx(full.max_steps / full.eval_interval, rel=0.05)
    # evaluation: as many times, never on more tokens, never on fewer than 64 windows
    assert full.eval_tokens >= short.eval_tokens >= 64 * full.block_size
    if steps <= full.max_steps and short.eval_tokens > 64 * full.block_size:  # the same share of compute
        assert short.eval_tokens / short.eval_interval == pytest.approx(full.eval_tokens / full.eval_interval, rel=0.05)
    # everything else is the recipe as it was
    assert dataclasses.replace(short, max_steps=full.max_steps, warmup_steps=full.warmup_steps,
                               eval_interval=full.eval_interval, eval_tokens=full.eval_tokens) == full
    # the lr still peaks at the end of warm-up and ends at min_lr
    assert get_lr(short.warmup_steps, short) == pytest.approx(full.learning_rate)
    assert get_lr(steps - 1, short) == pytest.approx(full.min_lr)


@pytest.mark.parametrize("name, memory_gib, split", [
    ("t4", 80, (128, 1)), ("t4", 40, (128, 1)), ("t4", 15, (64, 2)),  # a T4 keeps the preset's split
    ("seed", 80, (128, 8)), ("cpu", 80, (8, 1))])
def test_device_batch_regroups_a_step_into_larger_micro_batches_on_a_large_gpu(name, memory_gib, split):
    _, cfg = preset(name)
    big = slm_utils.device_batch(cfg, "cuda", memory_gib=memory_gib)
    assert (big.batch_size, big.grad_accum_steps) == split
    assert big.tokens_per_step == cfg.tokens_per_step  # the same windows per optimizer step
    assert dataclasses.replace(big, batch_size=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps) == cfg
    assert slm_utils.device_batch(cfg, "cpu") == cfg


def test_device_batch_takes_the_largest_micro_batch_that_divides_the_step():
    cfg = TrainConfig(batch_size=16, grad_accum_steps=12, block_size=128)  # 192 windows: 128 does not divide
    big = slm_utils.device_batch(cfg, "cuda", memory_gib=80)
    assert (big.batch_size, big.grad_accum_steps) == (96, 2)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_scale_schedule_to_a_few_steps_stays_valid(steps):
    _, full = preset("t4")
    short = scale_schedule(full, steps)
    assert 0 <= short.warmup_steps < steps and short.eval_interval >= 1
    assert (short.warmup_steps >= 1) == (steps > 1)  # a recipe with a warm-up keeps one where it can


def test_scale_schedule_refuses_no_steps():
    with pytest.raises(ConfigError, match="max_steps=0"):
        scale_schedule(preset("t4")[1], 0)


@pytest.mark.parametrize("kwargs, words", [
    (dict(learning_rate=1e-4, min_lr=5e-4), ["min_lr", "learning_rate"]),  # the seed's climbing "decay"
    (dict(warmup_steps=100, max_steps=100), ["warmup_steps", "max_steps"]),
    (dict(warmup_steps=1000, max_steps=625), ["warmup_steps", "max_steps"]),
    (dict(batch_size=0), ["batch_size"]),
    (dict(block_size=0), ["block_size"]),
    (dict(grad_accum_steps=0), ["grad_accum_steps"]),
    (dict(max_steps=0, warmup_steps=0), ["max_steps"]),
    (dict(eval_interval=0), ["eval_interval"]),
    (dict(eval_tokens=0), ["eval_tokens"]),
])
def test_nonsense_train_configs_are_rejected(kwargs, words):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**kwargs)
    message = str(info.value)
    for word in words:
        assert word in message
    assert isinstance(info.value, ValueError)


def test_cuda_graphs_on_a_cpu_are_refused_before_anything_is_written(shakespeare_dir, tmp_path):
    model_cfg, cfg = preset("smoke", device="cpu", compile=True, cuda_graphs=True, out_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"cuda_graphs=True needs one process on a CUDA device.*Fix: cuda_graphs=False"):
        train(slm_utils.GPT(model_cfg), shakespeare_dir, cfg)
    assert not (tmp_path / "run").exists()


# ---- precision --------------------------------------------------------------------------


@pytest.mark.parametrize("device, capability, expected", [
    ("cuda", (7, 5), torch.float16),  # T4: bf16 only emulated
    ("cuda", (7, 0), torch.float16),
    ("cuda", (8, 0), torch.bfloat16),  # A100
    ("cuda", (9, 0), torch.bfloat16),  # H100
    ("cpu", None, torch.float32),
])
def test_choose_amp_dtype(monkeypatch, device, capability, expected):
    def refuse():
        raise AssertionError("is_bf16_supported() says True on a T4; decide by compute capability")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", refuse)
    assert choose_amp_dtype(device, capability) == expected


# ---- optimizer ---------------------------------------------------------------------------


def test_optimizer_decays_only_matrices_and_holds_each_parameter_once():
    model = tiny_model()
    cfg = TrainConfig(weight_decay=0.1)
    opt = configure_optimizer(model, cfg, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    grouped = [(p, g["weight_decay"]) for g in opt.param_groups for p in g["params"]]
    ids = [id(p) for p, _ in grouped]
    assert len(ids) == len(set(ids))  # the tied wte / lm_head matrix appears once
    assert set(ids) == {id(p) for p in model.parameters()}
    for p, decay in grouped:
        assert decay == (0.1 if p.dim() >= 2 else 0.0)
    decayed = {name for name, p in model.named_parameters()
               if any(p is q for q, d in grouped if d > 0)}
    assert "transformer.wte.weight" in decayed and "transformer.wpe.weight" in decayed
    assert not any(name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")) for name in decayed)


def test_fused_adamw_is_the_default_on_cpu_and_steps_like_the_plain_one():
    models = [tiny_model(seed=0), tiny_model(seed=0)]
    cfg = TrainConfig(batch_size=2, block_size=16, max_steps=10, warmup_steps=2, weight_decay=0.1)
    opts = [configure_optimizer(models[0], cfg, "cpu"), configure_optimizer(models[1], cfg, "cpu", fused=False)]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    x = tokens((2, 16), 50257, 5)
    for model, opt in zip(models, opts):
        take_steps(model, opt, x)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_optimizer_falls_back_where_there_is_no_fused_kernel(monkeypatch):
    real = torch.optim.AdamW

    def without_fused(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(*args, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", without_fused)
    opt = configure_optimizer(tiny_model(), TrainConfig(), "cpu")
    assert isinstance(opt, real) and not opt.defaults["fused"]


# ---- gradient accumulation -----------------------------------------------------------------


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradient_accumulation_4x2_equals_1x8():
    x, y = tokens((8, 16), 50257, 1), tokens((8, 16), 50257, 2)
    model = tiny_model()
    _, loss = model(x, y)
    loss.backward()
    whole = grads(model)
    model.zero_grad(set_to_none=True)
    for i in range(4):
        _, loss = model(x[2 * i: 2 * i + 2], y[2 * i: 2 * i + 2])
        (loss / 4).backward()
    accumulated = grads(model)
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)


def test_train_loop_accumulates_like_one_big_batch(shakespeare_dir, tmp_path, monkeypatch):
    """train() itself: 4 micro-batches of 2 give the same loss and gradient as 1 batch of 8."""
    x, y = tokens((8, 16), 50257, 3), tokens((8, 16), 50257, 4)
    served = []

    def fixed_batches(data_dir, split, batch_size, block_size, device="cpu", generator=None):
        start = sum(served) % 8
        served.append(batch_size)
        return x[start:start + batch_size], y[start:start + batch_size]

    seen_grads = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def record_then_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        seen_grads.append([p.grad.clone() for p in params])
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(slm_utils, "get_batch", fixed_batches)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record_then_clip)
    histories = []
    for batch_size, accum in ((8, 1), (2, 4)):
        cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=0, max_steps=1, batch_size=batch_size,
                          block_size=16, grad_accum_steps=accum, eval_interval=1, eval_tokens=64,
                          out_dir=str(tmp_path / f"run{accum}"))
        histories.append(train(tiny_model(), shakespeare_dir, cfg))
    assert served == [8, 2, 2, 2, 2]
    assert histories[0]["train_loss"][0] == pytest.approx(histories[1]["train_loss"][0], rel=1e-5)
    assert histories[0]["tokens"] == histories[1]["tokens"] == [128]
    for whole, accumulated in zip(*seen_grads):
        torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-7)


# ---- checkpoints ----------------------------------------------------------------------------


class FakeCompiled(nn.Module):
    """Stands in for torch.compile's wrapper: holds the model as ``_orig_mod``."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def trained_a_step(model):
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=1, max_steps=5, batch_size=2, block_size=16)
    opt = configure_optimizer(model, cfg)
    _, loss = model(tokens((2, 16), 50257, 5), tokens((2, 16), 50257, 6))
    loss.backward()
    opt.step()
    return cfg, opt


def assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(seed=0)
    cfg, opt = trained_a_step(model)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, opt, step=7, best_val_loss=1.25, train_config=cfg)

    other = tiny_model(seed=1)
    other_opt = configure_optimizer(other, cfg)
    with pytest.raises(AssertionError):
        assert_same_weights(model, other)
    ckpt = load_checkpoint(path, other, other_opt)
    assert_same_weights(model, other)
    assert other.lm_head.weight is other.transformer.wte.weight  # still tied after loading
    assert ckpt["step"] == 7 and ckpt["best_val_loss"] == 1.25
    assert TrainConfig(**ckpt["train_config"]) == cfg
    saved_state, loaded_state = opt.state_dict(), other_opt.state_dict()
    assert saved_state["param_groups"] == loaded_state["param_groups"]
    assert len(loaded_state["state"]) == len(list(model.parameters()))
    for i, state in saved_state["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded_state["state"][i][key], value), (i, key)


def test_checkpoint_copies_get_the_same_whole_file(tmp_path):
    model = tiny_model(seed=0)
    cfg, opt = trained_a_step(model)
    path = save_checkpoint(tmp_path / "last.pt", model, opt, step=3, train_config=cfg,
                           copies=[tmp_path / "sub" / "best.pt"])
    assert path == tmp_path / "last.pt"
    assert (tmp_path / "sub" / "best.pt").read_bytes() == path.read_bytes()
    for p in (path, tmp_path / "sub" / "best.pt"):
        ckpt = load_checkpoint(p)
        assert ckpt["step"] == 3
        assert_same_weights(model, ckpt["gpt"])
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_file()) == ["best.pt", "last.pt"]  # no temporaries


def test_checkpoint_restores_config_and_scaler(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, block_size=24, n_layer=3, n_head=4, n_embd=48, dropout=0.05, bias=False)
    model = GPT(config)
    scaler = torch.amp.GradScaler("cpu", init_scale=1234.0)
    path = save_checkpoint(tmp_path / "c.pt", model, scaler=scaler)
    ckpt = load_checkpoint(path)  # no model given: built from the saved config
    assert ckpt["gpt"].config == config
    assert_same_weights(model, ckpt["gpt"])
    restored = torch.amp.GradScaler("cpu")
    load_checkpoint(path, GPT(config), scaler=restored)
    assert restored.get_scale() == 1234.0


def test_checkpoint_of_a_wrapped_model_has_plain_keys(tmp_path):
    model = tiny_model()
    wrapped = FakeCompiled(model)
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())  # what a naive save would write
    path = save_checkpoint(tmp_path / "w.pt", wrapped)
    saved_keys = set(load_checkpoint(path)["model"])
    assert saved_keys == set(model.state_dict())
    assert not any("_orig_mod" in k for k in saved_keys)
    fresh = load_model(path)  # loads into a plain GPT without complaint
    assert_same_weights(model, fresh)


def test_load_model_returns_an_eval_mode_gpt(tmp_path):
    model = tiny_model(dropout=0.1).train()
    path = save_checkpoint(tmp_path / "m.pt", model)
    loaded = load_model(path)
    assert isinstance(loaded, GPT) and not loaded.training
    assert_same_weights(model, loaded)


# ---- presets ---------------------------------------------------------------------------------


def test_preset_names():
    assert set(PRESETS) == {"seed", "t4", "cpu", "smoke", "gpt2-finetune"}
    for name in PRESETS:
        model_cfg, train_cfg = preset(name)
        assert isinstance(model_cfg, GPTConfig) and isinstance(train_cfg, TrainConfig)
        assert train_cfg.block_size <= model_cfg.block_size


def test_seed_preset_is_the_blog_recipe_fixed():
    m, t = preset("seed")
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (6, 6, 384, 128)
    assert m.vocab_size == 50257 and m.bias and m.dropout == 0.1
    assert (t.batch_size, t.grad_accum_steps, t.block_size) == (32, 32, 128)
    assert t.learning_rate == 1e-4 and t.min_lr < t.learning_rate
    assert 0 < t.warmup_steps < t.max_steps == 625
    assert t.max_steps * t.grad_accum_steps == 20_000  # the seed's micro-batches
    assert t.max_steps * t.tokens_per_step == 625 * 32 * 32 * 128
    assert round(t.max_steps * t.tokens_per_step / 1e6) == 82  # "about 82M tokens"
    assert (t.weight_decay, t.grad_clip) == (0.1, 0.5)
    lrs = [get_lr(s, t) for s in range(t.max_steps)]
    assert max(lrs) == pytest.approx(1e-4) and lrs[-1] == pytest.approx(t.min_lr)  # decays, never climbs


def test_preset_overrides():
    m, t = preset("smoke", n_layer=3, max_steps=5, out_dir="elsewhere", block_size=16)
    assert m.n_layer == 3 and t.max_steps == 5 and t.out_dir == "elsewhere"
    assert m.block_size == t.block_size == 16  # one window length for both
    base_m, base_t = preset("smoke")
    assert dataclasses.replace(m, n_layer=base_m.n_layer, block_size=base_m.block_size) == base_m
    with pytest.raises(ConfigError, match="min_lr"):
        preset("seed", min_lr=1.0)  # overrides are validated like any config


def test_unknown_preset_lists_the_names():
    with pytest.raises(ConfigError) as info:
        preset("gpt5")
    for name in ("seed", "t4", "cpu", "smoke"):
        assert name in str(info.value)


def test_unknown_override_is_rejected():
    with pytest.raises(ConfigError, match="learning_rte"):
        preset("smoke", learning_rte=1e-3)


# ---- a real (tiny) run --------------------------------------------------------------------


def test_smoke_training_lowers_val_loss(shakespeare_dir, tmp_path):
    model_cfg, cfg = preset("smoke", out_dir=str(tmp_path))
    torch.manual_seed(0)
    model = GPT(model_cfg)
    eval_x, eval_y = get_eval_windows(shakespeare_dir, cfg.block_size, cfg.eval_tokens)
    init_loss = estimate_loss(model, eval_x, eval_y, cfg.eval_batch_size)
    assert abs(init_loss - math.log(50257)) < 0.3
    calls = []
    history = train(model, shakespeare_dir, cfg, callback=lambda step, h: calls.append(step))

    steps = cfg.max_steps
    assert history["step"] == list(range(1, steps + 1)) == calls
    for key in ("tokens", "lr", "train_loss", "elapsed"):
        assert len(history[key]) == steps, key
    assert history["tokens"] == [s * cfg.tokens_per_step for s in history["step"]]
    assert history["lr"] == [pytest.approx(get_lr(s, cfg)) for s in range(steps)]
    evals = [s for s in range(1, steps + 1) if s % cfg.eval_interval == 0 or s == steps]
    assert history["val_step"] == evals
    assert len(history["val_loss"]) == len(history["val_tokens"]) == len(evals)
    assert history["tokens_per_s"] > 0 and history["train_time_s"] > 0
    assert all(math.isfinite(v) for v in history["train_loss"] + history["val_loss"])

    assert history["val_loss"][-1] < history["val_loss"][0]
    assert history["val_loss"][-1] < init_loss - 0.2  # a dozen steps: a clear, if small, drop
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    assert history["best_val_loss"] == min(history["val_loss"])
    best = load_model(tmp_path / "best.pt")
    assert estimate_loss(best, eval_x, eval_y, cfg.eval_batch_size) == pytest.approx(history["best_val_loss"],
                                                                                      rel=1e-5)


def test_checkpoint_policy_best_weights_only_and_last_on_a_timer(shakespeare_dir, tmp_path, monkeypatch):
    """best.pt holds the weights without optimizer state; with last_every_s, last.pt waits for the
    timer and is always written at the end; resuming from it still goes on."""
    writes = []
    real_save = slm_utils.save_checkpoint
    monkeypatch.setattr(slm_utils, "save_checkpoint",
                        lambda path, *a, **k: writes.append((Path(path).name, k["step"])) or real_save(path, *a, **k))
    model_cfg, cfg = preset("smoke", out_dir=str(tmp_path), max_steps=12, eval_interval=3, last_every_s=1e9)
    torch.manual_seed(0)
    train(GPT(model_cfg), shakespeare_dir, cfg)
    assert [w for w in writes if w[0] == "last.pt"] == [("last.pt", 12)]  # the timer never ran out: the end only
    assert len([w for w in writes if w[0] == "best.pt"]) >= 2
    best, last = (slm_utils.load_checkpoint(tmp_path / n) for n in ("best.pt", "last.pt"))
    assert best["optimizer"] is None and last["optimizer"] is not None
    assert (tmp_path / "best.pt").stat().st_size < 0.6 * (tmp_path / "last.pt").stat().st_size
    assert load_model(tmp_path / "best.pt").config == model_cfg
    more = dataclasses.replace(cfg, max_steps=15)
    assert train(GPT(model_cfg), shakespeare_dir, more, resume=True)["step"][-1] == 15
    with pytest.raises(ConfigError, match="last_every_s"):
        dataclasses.replace(cfg, last_every_s=-1)


def test_background_checkpoints_save_the_same_state(shakespeare_dir, tmp_path, monkeypatch):
    """Written in a background thread, the checkpoints hold what a foreground save holds, and a
    write that fails raises from train() itself."""
    saved = {}
    for background in (False, True):
        model_cfg, cfg = preset("smoke", out_dir=str(tmp_path / str(background)), background_checkpoints=background)
        torch.manual_seed(0)
        train(GPT(model_cfg), shakespeare_dir, cfg)
        saved[background] = {n: slm_utils.load_checkpoint(tmp_path / str(background) / n) for n in ("best.pt", "last.pt")}
    for name in ("best.pt", "last.pt"):
        a, b = saved[False][name], saved[True][name]
        assert a["step"] == b["step"] and a["history"]["val_loss"] == b["history"]["val_loss"]
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert str(saved[False]["last.pt"]["optimizer"]) == str(saved[True]["last.pt"]["optimizer"])
    resumed = dataclasses.replace(cfg, max_steps=cfg.max_steps + 3)
    assert train(GPT(model_cfg), shakespeare_dir, resumed, resume=True)["step"][-1] == cfg.max_steps + 3

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(slm_utils, "_atomic_write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(GPT(model_cfg), shakespeare_dir, dataclasses.replace(cfg, out_dir=str(tmp_path / "full")))


def test_fused_loss_trains_like_the_plain_head(shakespeare_dir, tmp_path):
    """train() with TrainConfig.loss_chunk: the same losses as without, to rounding, in training and
    in evaluation."""
    runs = {}
    for chunk in (0, 100):  # the smoke preset's micro-batch has 256 rows: 3 chunks, the last short
        model_cfg, cfg = preset("smoke", out_dir=str(tmp_path / str(chunk)), loss_chunk=chunk)
        torch.manual_seed(0)
        runs[chunk] = train(GPT(model_cfg), shakespeare_dir, cfg)
    for key in ("train_loss", "val_loss"):
        assert runs[100][key] == pytest.approx(runs[0][key], abs=2e-4), key
    assert runs[100]["val_loss"][-1] < runs[100]["val_loss"][0] - 0.1  # and it learns


# ---- plotting ---------------------------------------------------------------------------------


def fake_history():
    steps = list(range(1, 11))
    return {"step": steps, "tokens": [s * 256 for s in steps], "lr": [1e-3 * s / 10 for s in steps],
            "train_loss": [10.0 - 0.5 * s for s in steps], "val_step": [5, 10],
            "val_tokens": [1280, 2560], "val_loss": [7.9, 5.2]}


def horizontal_lines_at(fig: Figure, y: float) -> int:
    return sum(1 for ax in fig.axes for line in ax.get_lines()
               if len(line.get_ydata()) == 2 and all(v == y for v in line.get_ydata()))


def test_plot_history_returns_a_figure_with_reference_line():
    fig = slm_utils.plot_history(fake_history(), reference=1.72)
    try:
        assert isinstance(fig, Figure)
        assert len(fig.axes) == 2  # losses, learning rate
        assert horizontal_lines_at(fig, 1.72) == 1
        labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        assert any("1.72" in label for label in labels)
    finally:
        plt.close(fig)
    fig = slm_utils.plot_history(fake_history())
    try:
        assert horizontal_lines_at(fig, 1.72) == 0
    finally:
        plt.close(fig)
