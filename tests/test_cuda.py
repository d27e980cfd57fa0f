"""The GPU code paths, run only where CUDA is present (skipped on CPU-only machines and in CI).

What differs on a GPU and is therefore checked here: the autocast dtype chosen from the real
device, fp16 training with GradScaler, bf16 with torch.compile, compile with CUDA graphs (bf16, and
fp16 with GradScaler), pinned non-blocking batch loads, fused AdamW, the KV cache on device memory,
and a checkpoint written from the GPU loading on the CPU. ``bash bench/gpu_check.sh`` runs this file first.
"""

import math

import pytest
import torch
from helpers import copy_into_padded, count_graph_decoders, take_steps

import slm_utils as s

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def smoke(tmp_path, **overrides):
    model_cfg, cfg = s.preset("smoke", device="cuda", out_dir=str(tmp_path), **overrides)
    torch.manual_seed(0)
    return s.GPT(model_cfg), cfg


def learned(history) -> bool:
    """The smoke run's last val loss is clearly below the uniform guess it starts from."""
    return history["val_loss"][-1] < math.log(50257) - 0.3


def test_autocast_dtype_follows_the_real_device():
    expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    assert s.choose_amp_dtype("cuda") == expected


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_training_on_cuda_learns(dtype, shakespeare_dir, tmp_path):
    model, cfg = smoke(tmp_path, dtype=dtype)
    history = s.train(model, shakespeare_dir, cfg)
    assert next(model.parameters()).device.type == "cuda"
    assert all(math.isfinite(v) for v in history["train_loss"] + history["val_loss"])
    assert learned(history)
    # fp16 trains through GradScaler: its state is saved; bf16 needs none
    ckpt = s.load_checkpoint(tmp_path / "last.pt")
    if dtype == "float16":
        assert ckpt["scaler"] and ckpt["scaler"]["scale"] > 0
        assert history["skipped_steps"] <= 2  # an overflow or two at the first scale, not more
    else:
        assert not ckpt["scaler"]
    assert history["bad_steps"] == 0


def test_compiled_bf16_training_on_cuda_learns_and_saves_plain_keys(shakespeare_dir, tmp_path):
    model, cfg = smoke(tmp_path, dtype="bfloat16", compile=True)
    history = s.train(model, shakespeare_dir, cfg)
    assert learned(history)
    restored = s.load_model(tmp_path / "last.pt")  # onto the CPU, from a compiled GPU run
    assert not any(k.startswith("_orig_mod.") for k in restored.state_dict())
    x, y = s.get_eval_windows(shakespeare_dir, cfg.block_size, cfg.eval_tokens)
    on_cpu = s.estimate_loss(restored, x, y, cfg.eval_batch_size)
    assert on_cpu == pytest.approx(history["val_loss"][-1], abs=0.05)  # bf16 on the GPU vs fp32 here


def count_graph_calls(monkeypatch) -> dict:
    """Counts of ``torch.cuda.CUDAGraph.replay`` and ``capture_begin`` calls, kept up to date."""
    calls = {"replay": 0, "capture_begin": 0}
    for name in calls:
        original = getattr(torch.cuda.CUDAGraph, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.cuda.CUDAGraph, name, counting)
    return calls


def graphed_run(calls: dict, model, data_dir, cfg) -> tuple[dict, int, int]:
    """train() from a fresh compile: (history, graphs Inductor declined, replays beyond the one each
    recording makes)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    calls.update(replay=0, capture_begin=0)
    history = s.train(model, data_dir, cfg)
    return history, counters["inductor"]["cudagraph_skips"], calls["replay"] - calls["capture_begin"]


def test_cuda_graphs_train_like_compile_alone_and_really_replay(shakespeare_dir, tmp_path, monkeypatch):
    """compile=True with cuda_graphs=True runs the same kernels, replayed from CUDA graphs: train()
    gives the losses of compile alone, on the "t4" preset's blocks (Llama, untied, padded vocabulary,
    Muon, background checkpoints) with the fused head + loss and a length curriculum as well, and the
    graphs really replay: Inductor declined none (it counts those), and graphs recorded earlier ran
    again (a recording replays its graph once too; those are not counted)."""
    calls = count_graph_calls(monkeypatch)
    runs = []
    for graphs in (False, True):
        model, cfg = smoke(tmp_path / f"graphs-{graphs}", compile=True, cuda_graphs=graphs, arch="llama",
                           tie_weights=False, pad_vocab_multiple=64, optimizer="muon", background_checkpoints=True,
                           loss_chunk=64, curriculum_steps=4, curriculum_start=8)
        runs.append(graphed_run(calls, model, shakespeare_dir, cfg))
    (plain, _, plain_replays), (graphed, skips, graph_replays) = runs
    assert plain_replays == 0 and skips == 0
    assert graph_replays >= cfg.max_steps // 2  # the full-length stage's steps, after a warm-up and a recording
    assert learned(graphed)
    # the same kernels; atomics in a backward may still round differently from run to run
    assert graphed["train_loss"] == pytest.approx(plain["train_loss"], abs=0.01)
    assert graphed["val_loss"] == pytest.approx(plain["val_loss"], abs=0.01)


def test_cuda_graphs_under_fp16_and_gradscaler_learn_as_a_t4_would_run_them(shakespeare_dir, tmp_path, monkeypatch):
    """The T4's path (fp16 autocast) with CUDA graphs: the backward of the scaled loss is replayed from a
    graph, and GradScaler's unscale, overflow check and skipped steps run outside it on the gradients
    that replay wrote."""
    calls = count_graph_calls(monkeypatch)
    model, cfg = smoke(tmp_path, dtype="float16", compile=True, cuda_graphs=True)
    history, skips, replays = graphed_run(calls, model, shakespeare_dir, cfg)
    assert skips == 0 and replays >= cfg.max_steps // 2
    assert learned(history) and history["bad_steps"] == 0
    assert history["skipped_steps"] <= 2  # an overflow or two at the first scale, as without graphs
    assert s.load_checkpoint(tmp_path / "last.pt")["scaler"]["scale"] > 0


def test_pinned_batches_on_cuda_equal_the_cpu_ones(shakespeare_dir):
    a = s.get_batch(shakespeare_dir, "train", 8, 32, "cuda", torch.Generator().manual_seed(3))
    b = s.get_batch(shakespeare_dir, "train", 8, 32, "cpu", torch.Generator().manual_seed(3))
    assert a[0].device.type == "cuda" and a[0].dtype == torch.int64
    assert torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1])


def test_fused_adamw_on_cuda_matches_the_plain_one():
    torch.manual_seed(0)
    cfg = s.GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    models = [s.GPT(cfg).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    tcfg = s.TrainConfig(batch_size=4, block_size=16, max_steps=10, warmup_steps=2)
    opts = [s.configure_optimizer(models[0], tcfg, "cuda"), s.configure_optimizer(models[1], tcfg, "cuda", fused=False)]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    x = torch.randint(0, 256, (4, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for model, opt in zip(models, opts):
        take_steps(model, opt, x)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_stacked_muon_on_cuda_matches_one_matrix_at_a_time():
    """The GPU default (muon_stack 'auto' -> on) gives Muon's per-matrix update, up to bf16 rounding."""
    torch.manual_seed(0)
    cfg = s.GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=64, dropout=0.0, tie_weights=False)
    models = [s.GPT(cfg).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    tcfg = s.TrainConfig(batch_size=4, block_size=16, max_steps=10, warmup_steps=2, optimizer="muon")
    opts = [s.configure_optimizer(models[0], tcfg, "cuda"),
            s.configure_optimizer(models[1], s.TrainConfig(**{**tcfg.__dict__, "muon_stack": "off"}), "cuda")]
    assert opts[0].optimizers["muon"].stack and not opts[1].optimizers["muon"].stack
    x = torch.randint(0, 256, (4, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for model, opt in zip(models, opts):
        take_steps(model, opt, x)
    muon = {id(p) for g in opts[0].optimizers["muon"].param_groups for p in g["params"]}
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        if id(p) in muon:  # bf16 Newton-Schulz: compare the steps taken, not the last bits
            step_p, step_q = p.detach() - start[name], q.detach() - start[name]
            assert (step_p - step_q).norm() < 0.03 * step_q.norm(), name


def test_greedy_cache_equals_no_cache_on_cuda():
    torch.manual_seed(0)
    model = s.GPT(s.GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)  # varied greedy continuations, as in test_model.py
    model = model.cuda().eval()
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(13)).cuda()
    cached = model.generate(prompt, 60, temperature=0, use_kv_cache=True)
    uncached = model.generate(prompt, 60, temperature=0, use_kv_cache=False)
    assert cached.device.type == "cuda" and cached.shape == (2, 65)
    assert torch.equal(cached, uncached)
    assert all(len(set(row.tolist())) >= 5 for row in cached[:, 5:])


def test_padded_vocab_logits_equal_the_unpadded_ones_on_cuda():
    torch.manual_seed(0)
    plain = s.GPT(s.GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).cuda().eval()
    padded = s.GPT(s.GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                               pad_vocab_multiple=64)).cuda().eval()
    copy_into_padded(plain, padded)
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(9)).cuda()
    with torch.no_grad():
        a, loss_a = plain(x, x)
        b, loss_b = padded(x, x)
    assert b.shape == a.shape == (2, 16, 50257)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(loss_a, loss_b)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fused_head_and_loss_on_cuda_matches_the_plain_one(dtype):
    """TrainConfig.loss_chunk on the GPU, under autocast: the loss and the head's gradients as the
    plain path has them, to the half-precision rounding of the logits."""
    torch.manual_seed(0)
    model = s.GPT(s.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0,
                              pad_vocab_multiple=64)).cuda()
    x = torch.randint(0, 50257, (8, 64), device="cuda")
    results = []
    for chunk in (0, 200):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=getattr(torch, dtype)):
            _, loss = model(x, x, loss_chunk=chunk)
        loss.backward()
        results.append((loss.item(), model.lm_head.weight.grad.clone(), model.transformer.h[0].mlp.c_fc.weight.grad.clone()))
    (plain, head0, fc0), (fused, head1, fc1) = results
    assert fused == pytest.approx(plain, rel=2e-3)
    for a, b in ((head0, head1), (fc0, fc1)):
        assert (a - b).norm() / a.norm() < 0.02
    assert head1[50257:].count_nonzero() == 0


def test_compiled_training_with_the_fused_loss_learns(shakespeare_dir, tmp_path):
    model, cfg = smoke(tmp_path, compile=True, loss_chunk=128)
    assert learned(s.train(model, shakespeare_dir, cfg))


def test_cuda_graph_decoding_equals_the_cached_decoding():
    """GraphDecoder on the GPU: a graph is captured, replayed for every one-token step, and gives the
    tokens of ordinary cached decoding, past block_size (window hops re-prefill the same cache)."""
    torch.manual_seed(0)
    model = s.GPT(s.GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)  # lively: greedy decoding varies instead of repeating one token
    for length in (5, 31):  # 31: the first step fills the last slot of the 32-token context
        prompt = torch.randint(0, 97, (2, length), device="cuda")
        graphed = model.generate(prompt, 100, temperature=0, cuda_graph=True)
        assert torch.equal(graphed, model.generate(prompt, 100, temperature=0, cuda_graph=False))
    decoder = s.GraphDecoder(model, 2)
    decoder.prefill(prompt[:, :5])
    decoder.step(prompt[:, 5:6])
    assert decoder.graph is not None and decoder.cache.length == 6 and decoder.cache.pos.item() == 6
    again = model.generate(prompt[:, :5], 40, temperature=0, cuda_graph=decoder)  # the captured graph, reused
    assert torch.equal(again, model.generate(prompt[:, :5], 40, temperature=0, cuda_graph=False))


def test_generate_decodes_through_a_cuda_graph_by_default_on_the_gpu(monkeypatch):
    made = count_graph_decoders(monkeypatch)
    model = s.GPT(s.GPTConfig(vocab_size=97, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0)).cuda()
    prompt = torch.randint(0, 97, (1, 4), device="cuda")
    model.generate(prompt, 3, temperature=0)
    assert made == [1]
    model.generate(prompt, 3, temperature=0, cuda_graph=False)
    model.generate(prompt, 3, temperature=0, use_kv_cache=False)
    assert made == [1]
