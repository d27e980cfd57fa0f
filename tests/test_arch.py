"""Architecture options (RoPE, RMSNorm, SwiGLU, GQA, biases, tying), Muon, baselines, curriculum.

Each option must keep the model's contracts: causal, cache == no cache, attention maps, and
checkpoints; each bundle maps onto one transformers class; bad combinations are refused.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

import slm_utils as s

TINY = dict(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
# each option on its own, and the Llama bundle with GQA
OPTIONS = {
    "gpt2": {},
    "rope": dict(pos_emb="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "no_bias": dict(bias=False),
    "untied": dict(tie_weights=False),
    "llama": dict(s.arch_fields("llama"), n_kv_head=2),
}


def build(**overrides) -> s.GPT:
    torch.manual_seed(0)
    model = s.GPT(s.GPTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # norms start at exactly 1 / 0: perturb them so a wrong mapping would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(params=list(OPTIONS))
def option(request):
    return request.param


def test_causal_for_every_option(option):
    model = build(**OPTIONS[option])
    x = torch.randint(0, 97, (2, 12))
    changed = x.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 97
    a, _ = model(x)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_cache_matches_no_cache_for_every_option(option):
    model = build(**OPTIONS[option])
    prompt = torch.randint(0, 97, (2, 5))
    cached = model.generate(prompt, 30, temperature=0, use_kv_cache=True)  # past block_size: window hops
    plain = model.generate(prompt, 30, temperature=0, use_kv_cache=False)
    assert torch.equal(cached, plain)
    # and the logits themselves: one token at a time through the cache against a full forward
    cache = s.KVCache(model.config, 2, "cpu", torch.float32)
    seq = torch.randint(0, 97, (2, 10))
    steps = [model(seq[:, :4], cache=cache)[0]] + [model(seq[:, i:i + 1], cache=cache)[0] for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(seq)[0], atol=1e-5, rtol=1e-4)


def test_attention_maps_and_plain_path_for_every_option(option):
    model = build(**OPTIONS[option])
    idx = torch.randint(0, 97, (1, 10))
    maps = s.attention_maps(model, idx)
    assert len(maps) == 2 and maps[0].shape == (4, 10, 10)  # every query head, even with GQA
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(4, 10))
    assert torch.all(maps[0].triu(diagonal=1) == 0)
    sdpa, _ = model(idx)
    plain, _ = model.set_attention(False)(idx)
    torch.testing.assert_close(sdpa, plain, atol=1e-5, rtol=1e-4)


def test_checkpoint_round_trip_for_every_option(option, tmp_path):
    model = build(**OPTIONS[option])
    s.save_checkpoint(tmp_path / "m.pt", model)
    loaded = s.load_model(tmp_path / "m.pt")
    x = torch.randint(0, 97, (1, 12))
    torch.testing.assert_close(loaded(x)[0], model(x)[0], atol=0, rtol=0)
    if option != "gpt2":  # another option set is named field by field
        with pytest.raises(s.CheckpointError, match="different model"):
            s.load_checkpoint(tmp_path / "m.pt", build())


def test_gqa_shrinks_the_cache_by_the_group_size():
    mha = s.KVCache(s.GPTConfig(**TINY), 1, "cpu", torch.float32)
    gqa = s.KVCache(s.GPTConfig(**TINY, n_kv_head=2), 1, "cpu", torch.float32)
    mqa = s.KVCache(s.GPTConfig(**TINY, n_kv_head=1), 1, "cpu", torch.float32)
    assert mha.nbytes == 2 * gqa.nbytes == 4 * mqa.nbytes
    # and the projection: 4 query heads + 2 x 2 key/value heads of 8 dims
    assert build(n_kv_head=2).transformer.h[0].attn.c_attn.weight.shape == (4 * 8 + 2 * 2 * 8, 32)


def test_gqa_equals_multi_head_with_repeated_key_value_heads():
    """A GQA model is an MHA model whose key/value heads come in identical groups."""
    gqa = build(n_kv_head=2)
    mha = build()
    with torch.no_grad():
        for bg, bm in zip(gqa.transformer.h, mha.transformer.h):
            hs = 8
            q, k, v = bg.attn.c_attn.weight.split([32, 16, 16])
            rep = lambda w: w.view(2, hs, 32).repeat_interleave(2, dim=0).reshape(32, 32)  # noqa: E731
            bm.attn.c_attn.weight.copy_(torch.cat([q, rep(k), rep(v)]))
            qb, kb, vb = bg.attn.c_attn.bias.split([32, 16, 16])
            rep_b = lambda b: b.view(2, hs).repeat_interleave(2, dim=0).reshape(32)  # noqa: E731
            bm.attn.c_attn.bias.copy_(torch.cat([qb, rep_b(kb), rep_b(vb)]))
            for name in ("ln_1", "ln_2", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                src, dst = bg.get_submodule(name), bm.get_submodule(name)
                dst.load_state_dict(src.state_dict())
        for name in ("wte", "wpe", "ln_f"):
            mha.transformer[name].load_state_dict(gqa.transformer[name].state_dict())
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(gqa(x)[0], mha(x)[0], atol=1e-5, rtol=1e-4)


def test_rope_scores_depend_only_on_the_distance():
    cos, sin = s.rope_tables(8, 64, 10_000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        return (s.apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * s.apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum()

    torch.testing.assert_close(score(3, 1), score(40, 38))
    torch.testing.assert_close(score(10, 10), (q * k).sum())  # distance 0: as if unrotated
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rope_model_has_no_position_table_and_saves_no_tables(tmp_path):
    model = build(pos_emb="rope")
    assert "wpe" not in model.transformer
    assert not any("rope" in k for k in model.state_dict())  # rebuilt from the config, never stored
    assert s.count_parameters(model)["position_embedding"] == 0


def test_swiglu_keeps_the_parameter_count_of_the_gelu_mlp():
    seed = dict(n_layer=6, n_head=6, n_embd=384, bias=False)
    gelu = s.GPT(s.GPTConfig(**seed)).transformer.h[0].mlp
    swiglu = s.GPT(s.GPTConfig(**seed, mlp="swiglu")).transformer.h[0].mlp
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(swiglu) == count(gelu) == 2 * 4 * 384 * 384  # 8/3 x 384 = 1024 exactly
    for width in (32, 128, 192, 768):
        c = s.GPTConfig(n_embd=width, n_head=4, mlp="swiglu")
        assert c.hidden_size % 32 == 0
        assert abs(3 * c.hidden_size - 8 * width) / (8 * width) < 0.13  # within 13% at 32 wide, closer above
    assert s.GPTConfig(mlp="swiglu", mlp_hidden=100).hidden_size == 100


def test_seed_parameter_counts_stay_exact_for_gpt2():
    for block, total in ((128, 29_995_392), (512, 30_142_848)):
        cfg = s.GPTConfig.from_arch("gpt2", block_size=block, n_layer=6, n_head=6, n_embd=384)
        assert s.count_parameters(s.GPT(cfg))["total"] == total
    counts = s.count_parameters(s.GPT(s.GPTConfig(n_layer=6, n_head=6, n_embd=384, tie_weights=False)))
    assert counts["lm_head"] == 50257 * 384 and counts["total"] == 29_995_392 + 50257 * 384
    assert counts["tied_counted_twice"] == counts["total"]


def test_untied_head_is_a_separate_matrix():
    model = build(tie_weights=False)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    tied = build()
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()


def test_each_bundle_names_its_transformers_class():
    assert s.GPTConfig().hf_architecture == "GPT2LMHeadModel"
    assert s.GPTConfig(bias=False, tie_weights=False).hf_architecture == "GPT2LMHeadModel"
    assert s.GPTConfig.from_arch("llama").hf_architecture == "LlamaForCausalLM"
    assert s.GPTConfig.from_arch("llama", n_kv_head=2, bias=True, tie_weights=False).arch == "llama"
    for mix in (dict(pos_emb="rope"), dict(norm="rmsnorm"), dict(mlp="swiglu"), dict(n_kv_head=2)):
        cfg = s.GPTConfig(**mix)
        assert cfg.arch is None
        with pytest.raises(s.ConfigError, match="No transformers class.*Fix: build the model with arch="):
            cfg.hf_architecture


def test_preset_takes_an_arch_and_fields_beside_it():
    m, _ = s.preset("smoke", arch="llama", n_kv_head=1)
    assert (m.pos_emb, m.norm, m.mlp, m.bias, m.n_kv_head) == ("rope", "rmsnorm", "swiglu", False, 1)
    m, _ = s.preset("smoke", arch="llama", bias=True)
    assert m.bias
    with pytest.raises(s.ConfigError, match="Unknown arch 'mistral'"):
        s.preset("smoke", arch="mistral")


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_head=4, n_kv_head=3), r"n_head=4 is not divisible by n_kv_head=3.*Fix: choose n_kv_head among .*1, 2, 4"),
    (dict(n_head=4, n_kv_head=0), r"n_kv_head=0"),
    (dict(n_embd=36, n_head=4, pos_emb="rope"), r"head size n_embd / n_head = 9 is odd.*Fix"),
    (dict(pos_emb="sinusoidal"), r"pos_emb='sinusoidal' is not one of.*Fix"),
    (dict(norm="batchnorm"), r"norm='batchnorm'"),
    (dict(mlp="relu2"), r"mlp='relu2'"),
    (dict(rope_theta=0.0), r"rope_theta=0.0"),
    (dict(mlp_hidden=0), r"mlp_hidden=0"),
])
def test_incompatible_options_are_refused(kwargs, message):
    with pytest.raises(s.ConfigError, match=message):
        s.GPTConfig(**{**TINY, **kwargs})


# ---- Muon ---------------------------------------------------------------------------------------


def test_orthogonalize_pushes_singular_values_towards_one():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(24, 24))
    V, _ = torch.linalg.qr(torch.randn(64, 24))
    G = U @ torch.diag(torch.logspace(0, 1.5, 24)) @ V.T  # (24, 64), singular values 1 .. 31.6
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sv = torch.linalg.svdvals(s.orthogonalize(G, dtype=dtype).float())
        assert sv.min() > 0.5 and sv.max() < 1.3, (dtype, sv.min(), sv.max())
    tall = s.orthogonalize(G.T, dtype=torch.float32)
    torch.testing.assert_close(tall, s.orthogonalize(G, dtype=torch.float32).T)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs PyTorch 2.9+")
@pytest.mark.parametrize("stack", [False, True])
def test_muon_matches_torch_muon_in_bfloat16(stack):
    """Tall, wide and square matrices, two of one shape: one at a time exactly torch.optim.Muon's
    update; stacked by shape the same to rounding."""
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (32, 32), (48, 16)]
    ours_p = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    theirs_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = s.Muon(ours_p, lr=0.02, momentum=0.95, weight_decay=0.1, ns_dtype=torch.bfloat16, stack=stack)
    theirs = torch.optim.Muon(theirs_p, lr=0.02, momentum=0.95, weight_decay=0.1)
    assert len(ours._batches(ours_p)) == (3 if stack else 4)
    for _ in range(3):
        for a, b in zip(ours_p, theirs_p):
            g = torch.randn(a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, theirs_p):
        if stack:
            torch.testing.assert_close(a, b)
        else:
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_muon_takes_block_matrices_and_adamw_the_rest(tiny_config):
    model = s.GPT(dataclasses.replace(tiny_config, tie_weights=False))
    cfg = s.TrainConfig(optimizer="muon", max_steps=10, warmup_steps=1)
    opt = s.configure_optimizer(model, cfg)
    assert isinstance(opt, s.CombinedOptimizer)
    muon = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    adamw = {id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    assert adamw | muon == {id(p) for p in model.parameters()} and not adamw & muon
    assert {g["lr_scale"] for g in opt.optimizers["muon"].param_groups} == {cfg.muon_lr / cfg.learning_rate}


def test_muon_with_no_block_matrices_is_refused():
    with pytest.raises(s.ConfigError, match="optimizer='muon' found no 2-D weight matrices.*Fix: use optimizer='adamw'"):
        s.configure_optimizer(torch.nn.Linear(4, 4), s.TrainConfig(optimizer="muon"))
    with pytest.raises(s.ConfigError, match="Muon takes 2-D matrices only"):
        s.Muon([torch.nn.Parameter(torch.zeros(3))])


def test_orthogonalize_on_a_stack_equals_each_matrix_on_its_own():
    torch.manual_seed(0)
    for shape in [(24, 64), (64, 24)]:  # wide, and tall (worked on transposed)
        G = torch.randn(3, *shape)
        stacked = s.orthogonalize(G, dtype=torch.float32)
        assert stacked.shape == G.shape
        for i in range(3):
            torch.testing.assert_close(stacked[i], s.orthogonalize(G[i], dtype=torch.float32), atol=1e-5, rtol=1e-5)
    # a zero matrix beside others stays zero and leaves its neighbours alone: each has its own norm
    G = torch.stack([torch.zeros(8, 8), torch.randn(8, 8) * 100, torch.randn(8, 8) * 0.01])
    out = s.orthogonalize(G, dtype=torch.float32)
    assert torch.equal(out[0], torch.zeros(8, 8))
    for i in (1, 2):
        torch.testing.assert_close(out[i], s.orthogonalize(G[i], dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_stacked_muon_trains_as_muon_one_matrix_at_a_time(tiny_config, monkeypatch):
    """Stacking is a speed option: the same updates, up to the rounding of batched products."""
    cfg = dataclasses.replace(tiny_config, tie_weights=False)
    runs = {}
    strides = []  # (weight, update) strides: a GPU's foreach add is one launch only when they agree
    real_add = torch._foreach_add_

    def spy(tensors, others, **kwargs):
        if isinstance(others, (list, tuple)):  # tensors + tensors (not + a scalar)
            strides.extend((a.stride(), b.stride()) for a, b in zip(tensors, others))
        return real_add(tensors, others, **kwargs)

    monkeypatch.setattr(torch, "_foreach_add_", spy)
    for stack in ("off", "on"):
        torch.manual_seed(0)
        model = s.GPT(cfg)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        opt = s.configure_optimizer(model, s.TrainConfig(optimizer="muon", muon_stack=stack, max_steps=10,
                                                         warmup_steps=1))
        muon = opt.optimizers["muon"]
        assert muon.stack == (stack == "on")
        params = [p for g in muon.param_groups for p in g["params"]]
        batches = muon._batches(params)
        if stack == "on":  # one batch per shape: attention in, attention out, MLP in, MLP out
            assert sorted(len(b) for b in batches) == [2, 2, 2, 2]
            assert all(len({params[i].shape for i in b}) == 1 for b in batches)
        else:
            assert len(batches) == len(params) == 8
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=gen)
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
        runs[stack] = model.state_dict()
    assert strides and all(w == u for w, u in strides)  # tall matrices come back transposed, then contiguous
    for k, v in runs["off"].items():
        torch.testing.assert_close(runs["on"][k], v, atol=1e-5, rtol=1e-4)
    moved = [k for k, v in runs["on"].items() if ".h." in k and v.dim() == 2 and not torch.equal(v, start[k])]
    assert len(moved) == 8  # every Muon matrix took its steps


def test_muon_stacks_by_default_on_a_gpu_only(tiny_config):
    model = s.GPT(dataclasses.replace(tiny_config, tie_weights=False))
    stacked = lambda stack, device: s.configure_optimizer(  # noqa: E731
        model, s.TrainConfig(optimizer="muon", muon_stack=stack, muon_ns_dtype="float32"),
        device, fused=False).optimizers["muon"].stack
    assert not stacked("auto", "cpu") and stacked("auto", "cuda")
    assert stacked("on", "cpu") and not stacked("off", "cuda")


def test_muon_ns_dtype_by_device():
    assert s.muon_ns_dtype("auto", "cuda", (7, 5)) == torch.float16  # a T4: bf16 is only emulated
    assert s.muon_ns_dtype("auto", "cuda", (9, 0)) == torch.bfloat16
    assert s.muon_ns_dtype("auto", "cpu") == torch.float32
    assert s.muon_ns_dtype("bfloat16", "cpu") == torch.bfloat16


def test_resuming_with_another_optimizer_is_refused(shakespeare_dir, tmp_path):
    model = s.GPT(s.GPTConfig(**{**TINY, "vocab_size": 50257}))
    cfg = s.TrainConfig(max_steps=2, warmup_steps=0, batch_size=2, block_size=16, eval_interval=2, eval_tokens=64,
                        out_dir=str(tmp_path))
    s.train(model, shakespeare_dir, cfg)
    muon = dataclasses.replace(cfg, optimizer="muon", max_steps=4)
    with pytest.raises(s.CheckpointError, match="another recipe: optimizer: checkpoint 'adamw' vs 'muon'.*Fix: start"):
        s.train(model, shakespeare_dir, muon, resume=True)
    # loaded directly, without the recipe to compare, the optimizer state itself is refused
    with pytest.raises(s.CheckpointError, match="optimizer.*Fix: resume with the optimizer"):
        s.load_checkpoint(tmp_path / "last.pt", model, s.configure_optimizer(model, muon))


def test_resuming_with_another_recipe_names_the_fields_and_loads_nothing(shakespeare_dir, tmp_path):
    """A recipe field that changes the weights' path (here lr and Muon's momentum) is refused before any
    weight is touched; a field in RESUMABLE_CHANGES (max_steps, loss_chunk) is not."""
    torch.manual_seed(0)
    model = s.GPT(s.GPTConfig(**{**TINY, "vocab_size": 50257}))
    cfg = s.TrainConfig(max_steps=2, warmup_steps=0, batch_size=2, block_size=16, eval_interval=2, eval_tokens=64,
                        out_dir=str(tmp_path))
    s.train(model, shakespeare_dir, cfg)
    fresh = s.GPT(s.GPTConfig(**{**TINY, "vocab_size": 50257}))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    changed = dataclasses.replace(cfg, learning_rate=1e-3, muon_momentum=0.9)
    with pytest.raises(s.CheckpointError, match="learning_rate: checkpoint 0.0006 vs 0.001; muon_momentum: "):
        s.train(fresh, shakespeare_dir, changed, resume=True)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    longer = dataclasses.replace(cfg, max_steps=3, loss_chunk=16)
    assert s.train(fresh, shakespeare_dir, longer, resume=True)["step"][-1] == 3
    # the same windows per step cut differently (device_batch on a larger GPU) resumes; other windows do not
    regrouped = dataclasses.replace(longer, max_steps=4, batch_size=1, grad_accum_steps=2)
    assert s.train(fresh, shakespeare_dir, regrouped, resume=True)["step"][-1] == 4
    bigger = dataclasses.replace(longer, max_steps=5, batch_size=4)
    with pytest.raises(s.CheckpointError, match="batch_size: checkpoint 1 vs 4"):
        s.train(fresh, shakespeare_dir, bigger, resume=True)


# ---- training options -------------------------------------------------------------------------


def test_curriculum_keeps_tokens_per_step_and_doubles_the_window():
    cfg = s.TrainConfig(batch_size=8, block_size=64, max_steps=100, warmup_steps=1, curriculum_steps=40,
                        curriculum_start=16)
    shapes = [s.window_at(step, cfg) for step in range(100)]
    assert {b * t for b, t in shapes} == {8 * 64}
    windows = [t for _, t in shapes]
    assert windows[0] == 16 and windows[39] == 64 and windows[40:] == [64] * 60
    assert sorted(set(windows)) == [16, 32, 64] and windows == sorted(windows)
    assert s.window_at(5, s.TrainConfig()) == (32, 128)  # off by default


@pytest.mark.parametrize("kwargs, message", [
    (dict(curriculum_steps=10, curriculum_start=48), r"curriculum_start=48 must be block_size=128 divided by a power"),
    (dict(curriculum_steps=10, curriculum_start=128), r"curriculum_start=128"),
    (dict(curriculum_steps=2000), r"curriculum_steps=2000 must be >= 0 and smaller than max_steps"),
    (dict(optimizer="sgd"), r"optimizer='sgd' must be 'adamw' or 'muon'"),
    (dict(muon_lr=0.0), r"muon_lr=0.0"),
    (dict(embedding_lr=-1.0), r"embedding_lr=-1.0"),
    (dict(muon_ns_dtype="float8"), r"muon_ns_dtype='float8'"),
    (dict(muon_stack="yes"), r"muon_stack='yes' must be 'auto', 'on' or 'off'"),
    (dict(cuda_graphs=True), r"cuda_graphs=True replays the graphs torch.compile builds. Fix: set compile=True"),
    (dict(compile=True, cuda_graphs=True, batch_size=64, grad_accum_steps=2),
     r"one micro-batch per optimizer step, not grad_accum_steps=2.*Fix: batch_size=128, grad_accum_steps=1"),
])
def test_bad_training_options_are_refused(kwargs, message):
    with pytest.raises(s.ConfigError, match=message):
        s.TrainConfig(**kwargs)


def test_embedding_lr_gets_its_own_group(tiny_config):
    model = s.GPT(tiny_config)
    opt = s.configure_optimizer(model, s.TrainConfig(learning_rate=1e-3, embedding_lr=1e-2))
    table = [g for g in opt.param_groups if any(p is model.transformer.wte.weight for p in g["params"])]
    assert len(table) == 1 and table[0]["lr_scale"] == pytest.approx(10.0) and table[0]["weight_decay"] == 0.0
    assert any(p is model.transformer.wpe.weight for p in table[0]["params"])


def test_train_step_learns_and_drops_a_non_finite_step(tiny_config):
    torch.manual_seed(0)
    model = s.GPT(tiny_config)
    opt = s.configure_optimizer(model, s.TrainConfig(learning_rate=3e-3))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randint(0, 100, (4, 16))
    batches = [(x[:2], x[:2]), (x[2:], x[2:])]
    first = s.train_step(model, opt, scaler, batches)
    for _ in range(10):
        last = s.train_step(model, opt, scaler, batches)
    assert first.finite and not first.skipped and last.loss < first.loss - 1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[0, 0] = float("nan")
    bad = s.train_step(model, opt, scaler, batches)
    assert not bad.finite
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "c_attn.weight" not in k)


def test_llama_muon_curriculum_training_learns(shakespeare_dir, tmp_path):
    m, t = s.preset("smoke", arch="llama", n_kv_head=1, optimizer="muon", curriculum_steps=6, curriculum_start=8,
                    out_dir=str(tmp_path))
    torch.manual_seed(0)
    history = s.train(s.GPT(m), shakespeare_dir, t)
    assert history["val_loss"][-1] < history["val_loss"][0] < math.log(50257) + 0.5
    assert history["tokens"][-1] == t.max_steps * t.tokens_per_step


# ---- baselines ----------------------------------------------------------------------------------


def write_corpus(data_dir, train: np.ndarray, val: np.ndarray, vocab: int = 50257):
    import json

    data_dir.mkdir(parents=True, exist_ok=True)
    train.astype(np.uint16).tofile(data_dir / "train.bin")
    val.astype(np.uint16).tofile(data_dir / "val.bin")
    meta = {"format_version": s.DATA_FORMAT_VERSION, "source": "test", "fingerprint": str(hash(val.tobytes())),
            "vocab_size": vocab, "dtype": "uint16",
            "splits": {"train": {"documents": 1, "tokens": len(train)}, "val": {"documents": 1, "tokens": len(val)}}}
    (data_dir / "meta.json").write_text(json.dumps(meta))
    return data_dir


def test_baselines_on_a_corpus_with_known_answers(tmp_path):
    cycle = np.tile(np.arange(10), 2000)  # 0 1 2 ... 9 0 1 ...: the previous token decides the next
    losses = s.baseline_losses(write_corpus(tmp_path / "d", cycle, cycle[:500], vocab=10))
    assert losses["uniform"] == pytest.approx(math.log(10))
    assert losses["unigram"] == pytest.approx(math.log(10), abs=1e-3)  # every token equally frequent
    assert losses["bigram_lambda"] == 0.95  # the largest weight on the grid: the bigram is always right
    assert losses["bigram"] < 0.1
    assert (tmp_path / "d" / "baselines.json").is_file()


def test_baselines_never_look_at_val_to_choose_the_smoothing(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 50, 20_000)
    a = s.baseline_losses(write_corpus(tmp_path / "a", train, np.tile(np.arange(10), 100)))
    b = s.baseline_losses(write_corpus(tmp_path / "b", train, rng.integers(0, 50, 1000)))
    assert a["bigram_lambda"] == b["bigram_lambda"]
    assert a["bigram"] != b["bigram"]


def test_plot_history_draws_the_baselines():
    import matplotlib

    matplotlib.use("Agg")
    history = {"tokens": [1, 2], "train_loss": [6.0, 5.0], "val_tokens": [2], "val_loss": [5.1],
               "step": [1, 2], "lr": [1e-3, 1e-3]}
    fig = s.plot_history(history, baselines={"unigram": 6.5, "bigram": 5.2})
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert any(label.startswith("unigram") for label in labels) and any(label.startswith("bigram") for label in labels)


def test_presets_take_the_winning_recipe_and_seed_stays_the_blogs():
    for name in ("cpu", "t4"):
        m, t = s.preset(name)
        assert m.hf_architecture == "LlamaForCausalLM" and not m.tie_weights
        assert t.optimizer == "muon" and t.embedding_lr > t.learning_rate
    m, t = s.preset("seed")
    assert m.hf_architecture == "GPT2LMHeadModel" and m.tie_weights and t.optimizer == "adamw"
    m, t = s.preset("t4", arch="gpt2", optimizer="adamw", embedding_lr=None, tie_weights=True)
    assert s.count_parameters(s.GPT(m))["total"] == 29_995_392  # the old "t4" model, padding not counted
