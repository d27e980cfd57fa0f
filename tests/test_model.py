"""The model and sampling: parameter counts, init loss, causality, both attention paths,
padded vocabulary, the KV cache, and top-k / top-p filtering."""

import dataclasses
import math

import pytest
import torch
from helpers import copy_into_padded, count_graph_decoders

import slm_utils
from slm_utils import (
    GPT,
    ConfigError,
    GPTConfig,
    context_start,
    count_parameters,
    sample_next,
    top_k_filter,
    top_p_filter,
)

SEED_SHAPE = dict(vocab_size=50257, n_layer=6, n_head=6, n_embd=384, bias=True)
NEG_INF = float("-inf")


def tiny(vocab_size=50257, block_size=16, dropout=0.0, **kw) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                     dropout=dropout, **kw)


def tokens(shape, vocab_size, seed):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def lively_model() -> GPT:
    """A small-vocabulary model with large random weights, in eval mode.

    A freshly initialised GPT repeats one token under greedy decoding, which would make
    cache / no-cache comparisons say little. Larger weights give varied continuations.
    """
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=97))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return model.eval()


# ---- parameter counts ------------------------------------------------------------------


def meta_model(**kw) -> GPT:
    """Shapes without memory or init cost: counting needs only ``numel``."""
    with torch.device("meta"):
        return GPT(GPTConfig(dropout=0.0, **kw))


def test_seed_shape_parameter_counts():
    counts = count_parameters(meta_model(block_size=128, **SEED_SHAPE))
    assert counts["total"] == 29_995_392
    assert counts["tied_counted_twice"] == 29_995_392 + 50257 * 384  # the blog's "~50M"
    assert counts["padding"] == 0
    assert counts["token_embedding"] == 50257 * 384
    assert counts["position_embedding"] == 128 * 384
    C = 384
    assert counts["per_block"] == 12 * C * C + 13 * C  # qkv + proj + 4x MLP + two LayerNorms
    assert counts["blocks"] == 6 * counts["per_block"]
    parts = counts["embedding"] + counts["blocks"] + counts["final_layernorm"]
    assert parts == counts["total"]
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]


def test_block_size_512_parameter_count():
    assert count_parameters(meta_model(block_size=512, **SEED_SHAPE))["total"] == 30_142_848


def test_tied_weights_are_one_tensor():
    model = GPT(tiny())
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = sum(p.numel() for p in model.parameters())  # nn.Module yields a shared tensor once
    assert count_parameters(model)["total"] == unique


def test_padded_vocab_keeps_total_and_reports_padding():
    plain = count_parameters(meta_model(block_size=128, **SEED_SHAPE))
    padded = count_parameters(meta_model(block_size=128, pad_vocab_multiple=64, **SEED_SHAPE))
    assert padded["total"] == plain["total"] == 29_995_392
    assert padded["padding"] == (50304 - 50257) * 384
    assert padded["tied_counted_twice"] == plain["tied_counted_twice"]


# ---- forward pass ------------------------------------------------------------------------


def test_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, dropout=0.1, **SEED_SHAPE)).eval()
    # Targets independent of the inputs: with tied weights the model at init favours its own
    # input token, so targets equal to the inputs would not measure a uniform guess.
    x, y = tokens((4, 64), 50257, 1), tokens((4, 64), 50257, 2)
    with torch.no_grad():
        logits, loss = model(x, y)
    assert logits.shape == (4, 64, 50257)
    assert abs(loss.item() - math.log(50257)) < 0.3


def test_forward_shapes_and_no_loss_without_targets():
    model = GPT(tiny(vocab_size=61)).eval()
    logits, loss = model(tokens((3, 16), 61, 0))
    assert logits.shape == (3, 16, 61) and loss is None
    with pytest.raises(ConfigError, match="block_size"):
        model(tokens((1, 17), 61, 0))


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "manual"])
def test_causality(use_sdpa):
    torch.manual_seed(0)
    model = GPT(tiny()).set_attention(use_sdpa).eval()
    x = tokens((2, 16), 50257, 3)
    x_changed = x.clone()
    x_changed[:, 10:] = tokens((2, 6), 50257, 4)
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x_changed)
        prefix, _ = model(x[:, :10])
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[:, :10], prefix, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)  # the future did change something


def test_sdpa_equals_manual_attention():
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.1)).eval()
    x, y = tokens((3, 16), 50257, 5), tokens((3, 16), 50257, 6)
    with torch.no_grad():
        fast, fast_loss = model.set_attention(True)(x, y)
        plain, plain_loss = model.set_attention(False)(x, y)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-5)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=128))
    x, y = tokens((4, 16), 128, 7), tokens((4, 16), 128, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(300):
        _, loss = model(x, y)
        losses.append(loss.item())
        if losses[-1] < 1.0:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert losses[0] > 4.0  # ~ln(128) to start with
    assert losses[-1] < 1.0, f"loss only reached {losses[-1]:.3f} after {len(losses)} steps"


def test_padded_vocab_gives_same_logits_and_loss():
    torch.manual_seed(0)
    plain = GPT(tiny()).eval()
    padded = GPT(tiny(pad_vocab_multiple=64)).eval()
    assert padded.transformer.wte.weight.shape == (50304, 32)
    assert torch.all(padded.transformer.wte.weight[50257:] == 0)  # inert at init
    copy_into_padded(plain, padded)
    x, y = tokens((2, 16), 50257, 9), tokens((2, 16), 50257, 10)
    with torch.no_grad():
        a, loss_a = plain(x, y)
        b, loss_b = padded(x, y)
    assert b.shape == a.shape == (2, 16, 50257)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(loss_a, loss_b)


def test_padded_rows_get_no_gradient():
    model = GPT(tiny(pad_vocab_multiple=64))
    _, loss = model(tokens((2, 16), 50257, 11), tokens((2, 16), 50257, 12))
    loss.backward()
    grad = model.transformer.wte.weight.grad
    assert torch.all(grad[50257:] == 0)
    assert grad[:50257].abs().sum() > 0


# ---- generation ----------------------------------------------------------------------------


def test_context_start_properties():
    for bs in (1, 2, 3, 8, 16, 17):
        hop = max(1, bs // 2)
        previous = 0
        for length in range(1, 6 * bs + 2):
            start = context_start(length, bs)
            if length <= bs:
                assert start == 0
            else:
                assert bs // 2 + 1 <= length - start <= bs, (bs, length, start)
                assert start % hop == 0
            assert start >= previous  # the window only moves forward
            previous = start


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "manual"])
def test_greedy_cache_equals_no_cache_past_block_size(lively_model, use_sdpa):
    model = lively_model.set_attention(use_sdpa)
    prompt = tokens((2, 5), 97, 13)
    cached = model.generate(prompt, 60, temperature=0, use_kv_cache=True)
    uncached = model.generate(prompt, 60, temperature=0, use_kv_cache=False)
    model.set_attention(True)
    assert cached.shape == (2, 65)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)
    assert all(len(set(row.tolist())) >= 5 for row in cached[:, 5:])  # varied, so the check means something


def test_cached_decoder_steps_equal_a_full_forward(lively_model):
    """CachedDecoder, the path generate() takes: prefill, then one token per step, each step's
    logits those of the last position of a forward over the whole sequence so far."""
    seq = tokens((2, 12), 97, 21)
    decoder = slm_utils.CachedDecoder(lively_model, 2)
    with torch.no_grad():
        steps = [decoder.prefill(seq[:, :4])] + [decoder.step(seq[:, t:t + 1]) for t in range(4, 12)]
        for t, got in zip(range(4, 13), steps):
            want, _ = lively_model(seq[:, :t], last_only=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        decoder.prefill(seq[:, 6:])  # a prefill starts afresh: the window may hop
        assert decoder.cache.length == 6


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "manual"])
def test_static_cache_steps_equal_the_growing_cache(lively_model, use_sdpa):
    """The fixed-shape steps a CUDA graph replays (GraphDecoder; on a CPU without the graph): the
    same tokens as the ordinary cache past block_size, and the same logits at every step."""
    model = lively_model.set_attention(use_sdpa)
    prompt = tokens((2, 5), 97, 13)
    static = model.generate(prompt, 60, temperature=0, cuda_graph=True)
    assert torch.equal(static, model.generate(prompt, 60, temperature=0))
    decoder, cache = slm_utils.GraphDecoder(model, 2), slm_utils.KVCache(model.config, 2, "cpu", torch.float32)
    with torch.no_grad():
        decoder.prefill(static[:, :5])
        model(static[:, :5], cache=cache)
        for t in range(5, 16):  # up to block_size
            a = decoder.step(static[:, t:t + 1])
            b, _ = model(static[:, t:t + 1], cache=cache, last_only=True)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert decoder.cache.length == cache.length == 16 and decoder.cache.pos.item() == 16
    model.set_attention(True)


def test_cuda_graph_takes_a_flag_or_a_graph_decoder(lively_model):
    prompt = tokens((1, 3), 97, 5)
    for wrong in (slm_utils.CachedDecoder(lively_model, 1), "yes"):
        with pytest.raises(slm_utils.ConfigError, match="cuda_graph"):
            lively_model.generate(prompt, 2, cuda_graph=wrong)


def test_generate_builds_no_graph_decoder_on_the_cpu_unless_asked(lively_model, monkeypatch):
    made = count_graph_decoders(monkeypatch)
    prompt = tokens((1, 3), 97, 5)
    default = lively_model.generate(prompt, 6, temperature=0)  # cuda_graph=None: a graph on a GPU only
    assert made == []
    assert torch.equal(default, lively_model.generate(prompt, 6, temperature=0, cuda_graph=True)) and made == [1]


def test_graph_decoder_refuses_dropout_in_training_mode():
    """A graph would replay one dropout mask forever; without dropout, training mode changes nothing."""
    torch.manual_seed(0)
    with_dropout, without = GPT(tiny(vocab_size=97, dropout=0.1)), GPT(tiny(vocab_size=97))  # both in training mode
    decoder = slm_utils.GraphDecoder(with_dropout, 1)
    decoder.prefill(tokens((1, 3), 97, 5))
    with pytest.raises(slm_utils.ConfigError, match="eval mode"):
        decoder.step(tokens((1, 1), 97, 6))
    with_dropout.eval()  # the fix the message gives
    assert decoder.step(tokens((1, 1), 97, 6)).shape == (1, 1, 97)
    decoder = slm_utils.GraphDecoder(without, 1)
    decoder.prefill(tokens((1, 3), 97, 5))
    assert decoder.step(tokens((1, 1), 97, 6)).shape == (1, 1, 97)


def test_static_cache_with_rope_and_gqa_equals_the_growing_cache():
    torch.manual_seed(0)
    cfg = GPTConfig.from_arch("llama", vocab_size=97, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                              dropout=0.0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)  # lively: greedy decoding varies instead of repeating one token
    prompt = tokens((1, 3), 97, 5)
    out = model.generate(prompt, 40, temperature=0, cuda_graph=True)
    assert torch.equal(out, model.generate(prompt, 40, temperature=0))
    assert len(set(out[0, 3:].tolist())) >= 5


def test_greedy_continues_the_argmax_of_a_full_forward(lively_model):
    prompt = tokens((1, 6), 97, 14)
    out = lively_model.generate(prompt, 8, temperature=0)
    for t in range(6, 14):  # all within block_size: each token is the argmax given everything before it
        with torch.no_grad():
            logits, _ = lively_model(out[:, :t])
        assert out[0, t].item() == logits[0, -1].argmax().item()


def test_sampling_with_cache_equals_without(lively_model):
    prompt = tokens((2, 3), 97, 15)
    kw = dict(temperature=1.5, top_k=20, top_p=0.95)
    a = lively_model.generate(prompt, 40, use_kv_cache=True, generator=torch.Generator().manual_seed(1), **kw)
    b = lively_model.generate(prompt, 40, use_kv_cache=False, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)


def test_seeded_generator_is_reproducible():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()  # near-uniform next-token distribution over 50,257 tokens
    prompt = tokens((1, 4), 50257, 16)

    def run(seed):
        return model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(123), run(123))
    assert not torch.equal(run(123), run(124))


def test_generate_restores_mode_and_runs_in_eval_without_grad():
    model = GPT(tiny(dropout=0.1))
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, torch.is_grad_enabled())))
    prompt = tokens((1, 4), 50257, 17)
    model.train()
    model.generate(prompt, 3, temperature=0)
    assert model.training
    model.eval()
    model.generate(prompt, 3, temperature=0)
    assert not model.training
    assert seen and all(state == (False, False) for state in seen)


def test_generate_stream_yields_what_generate_returns(lively_model):
    prompt = tokens((2, 4), 97, 18)
    full = lively_model.generate(prompt, 25, temperature=0)
    streamed = list(lively_model.generate_stream(prompt, 25, temperature=0))
    assert len(streamed) == 25 and streamed[0].shape == (2,)
    assert torch.equal(torch.stack(streamed, dim=1), full[:, 4:])
    kw = dict(temperature=1.0, top_k=10)
    sampled = lively_model.generate(prompt, 25, generator=torch.Generator().manual_seed(5), **kw)
    streamed = lively_model.generate_stream(prompt, 25, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(torch.stack(list(streamed), dim=1), sampled[:, 4:])


def test_stop_token_stops_early(lively_model):
    prompt = tokens((2, 4), 97, 19)
    free = lively_model.generate(prompt, 30, temperature=0)[:, 4:]
    stop = free[0, 2].item()

    def first(row):
        hits = (row == stop).nonzero()
        return hits[0].item() if len(hits) else None

    ends = [first(row) for row in free]
    expected_new = 30 if None in ends else max(ends) + 1
    out = lively_model.generate(prompt, 30, temperature=0, stop_token=stop)[:, 4:]
    assert out.shape[1] == expected_new
    for row, end, reference in zip(out, ends, free):
        if end is None:  # never stopped: the rows do not influence each other
            assert torch.equal(row, reference[:expected_new])
        else:
            assert torch.equal(row[: end + 1], reference[: end + 1])
            assert torch.all(row[end:] == stop)  # a finished row is padded with the stop token


def test_one_row_stops_at_its_stop_token(lively_model):
    prompt = tokens((1, 4), 97, 20)
    free = lively_model.generate(prompt, 30, temperature=0)[0, 4:]
    stop = free[5].item()
    end = (free == stop).nonzero()[0].item()
    out = lively_model.generate(prompt, 30, temperature=0, stop_token=stop)[0, 4:]
    assert out.tolist() == free[: end + 1].tolist()


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0), dict(top_k=98),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=-1)])
def test_meaningless_sampling_settings_are_rejected(lively_model, bad):
    kw = dict(max_new_tokens=3) | bad
    with pytest.raises(ConfigError):
        lively_model.generate(tokens((1, 2), 97, 0), **kw)


# ---- top-k / top-p -----------------------------------------------------------------------------


def kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row != NEG_INF).flatten().tolist()) for row in filtered]


def test_top_k_filter_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0],
                           [-2.0, 0.5, 4.0, 1.5, 0.0]])
    assert kept(top_k_filter(logits, 1)) == [{1}, {2}]
    assert kept(top_k_filter(logits, 2)) == [{1, 2}, {2, 3}]
    assert kept(top_k_filter(logits, 3)) == [{0, 1, 2}, {1, 2, 3}]
    assert kept(top_k_filter(logits, 5)) == [set(range(5))] * 2
    out = top_k_filter(logits, 2)
    assert torch.equal(out[out != NEG_INF], logits[out != NEG_INF])  # kept logits are unchanged
    assert torch.equal(logits[0], torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0]))  # input not modified


def test_top_p_filter_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.15, 0.50, 0.05, 0.30],
                          [0.30, 0.05, 0.50, 0.15]])
    logits = probs.log()
    # sorted row 0: 0.50 (1), 0.30 (3), 0.15 (0), 0.05 (2); cumulative 0.50, 0.80, 0.95, 1.00
    assert kept(top_p_filter(logits, 0.4)) == [{1}, {2}]
    assert kept(top_p_filter(logits, 0.6)) == [{1, 3}, {2, 0}]
    assert kept(top_p_filter(logits, 0.85)) == [{1, 3, 0}, {2, 0, 3}]
    assert kept(top_p_filter(logits, 0.97)) == [{0, 1, 2, 3}] * 2
    assert kept(top_p_filter(logits, 1.0)) == [{0, 1, 2, 3}] * 2
    out = top_p_filter(logits, 0.6)
    assert torch.equal(out[out != NEG_INF], logits[out != NEG_INF])


def peaked_logits() -> torch.Tensor:
    """Logits spread like a trained model's: a few likely tokens and a long, very unlikely tail."""
    return torch.randn(8, 1000, generator=torch.Generator().manual_seed(0)) * 5


def test_top_p_one_keeps_everything():
    # in float32 the cumulative sum of such a row reaches 1.0 before its tail does
    logits = peaked_logits()
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_the_top_token_always_survives():
    logits = peaked_logits()
    best = logits.argmax(dim=-1)
    for filtered in (top_p_filter(logits, 1e-6), top_k_filter(logits, 1)):
        assert kept(filtered) == [{i} for i in best.tolist()]


def test_sampling_draws_only_from_the_kept_set():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]]).expand(2000, 5)
    gen = torch.Generator().manual_seed(0)
    drawn = set(sample_next(logits, 1.0, top_k=2, generator=gen).flatten().tolist())
    assert drawn == {1, 2}
    # probabilities 0.64, 0.23, 0.09, 0.03, 0.01: a nucleus of 0.8 needs the first two
    drawn = set(sample_next(logits, 1.0, top_p=0.8, generator=gen).flatten().tolist())
    assert drawn == {1, 2}
    assert torch.equal(sample_next(logits, 0.0).flatten(), torch.full((2000,), 1))


def test_layer_grad_norms_show_the_residual_path(tiny_config):
    """Without shortcuts the gradient fades with depth; with them every block gets a similar one."""
    torch.manual_seed(0)
    model = slm_utils.GPT(dataclasses.replace(tiny_config, n_layer=12))
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with_path = slm_utils.layer_grad_norms(model, idx, idx)
    without = slm_utils.layer_grad_norms(model, idx, idx, residual=False)
    assert max(with_path) / min(with_path) < 2
    assert without[0] < 0.1 * without[-1]
    assert all(b.residual for b in model.transformer.h) and all(p.grad is None for p in model.parameters())


def test_tanh_gelu_is_an_option():
    """GPT-2's own weights were trained with the tanh approximation; exact erf is the default."""
    exact = slm_utils.MLP(slm_utils.GPTConfig(n_embd=8, n_head=2))
    tanh = slm_utils.MLP(slm_utils.GPTConfig(n_embd=8, n_head=2, gelu_approximate="tanh"))
    assert exact.act.approximate == "none" and tanh.act.approximate == "tanh"
    with pytest.raises(slm_utils.ConfigError, match="gelu_approximate"):
        slm_utils.GPTConfig(gelu_approximate="sigmoid")


# ---- the fused head + loss (GPTConfig-independent: a forward option) ------------------

@pytest.mark.parametrize("config", [
    dict(pad_vocab_multiple=64),  # GPT-2 blocks, tied head, padded rows
    dict(arch="llama", tie_weights=False, n_kv_head=1),
], ids=["gpt2-tied-padded", "llama-untied"])
def test_fused_loss_equals_plain_loss_and_gradients(config):
    shape = dict(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    cfg = GPTConfig.from_arch(config.pop("arch", "gpt2"), **shape, **config)
    torch.manual_seed(0)
    model = GPT(cfg)
    x, y = tokens((3, 16), 97, 1), tokens((3, 16), 97, 2)
    y[0, :5] = -1  # ignored targets count in neither loss
    grads = []
    for chunk in (0, 7):  # 48 rows in chunks of 7: the last chunk is short
        model.zero_grad(set_to_none=True)
        logits, loss = model(x, y, loss_chunk=chunk)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert (logits is None) == (chunk > 0)
    (plain, g0), (fused, g1) = grads
    assert fused == pytest.approx(plain, abs=1e-6)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6, rtol=1e-4), name
    assert model.lm_head.weight.grad[97:].count_nonzero() == 0  # padded rows, if any, get no gradient


def padded_fused_case():
    """A 1-layer model with padded head rows, 48 rows of which 5 are ignored: chunks of 7 leave a short one."""
    cfg = GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0, pad_vocab_multiple=64)
    torch.manual_seed(0)
    x, y = tokens((3, 16), 97, 1), tokens((3, 16), 97, 2)
    y[0, :5] = -1
    return GPT(cfg), x, y


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_loss_makes_the_same_values_the_way_it_runs_compiled(monkeypatch, autocast):
    """Under torch.compile the fused loss makes each chunk's gradient out of place (so that Inductor
    fuses it into one kernel); eagerly, in place. Run eagerly, the compiled way must give the same
    loss and gradients, bit for bit: padded columns, ignored targets and a short last chunk."""
    model, x, y = padded_fused_case()
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, y, loss_chunk=7)[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager, g0), (compiled, g1) = results
    assert torch.equal(eager, compiled)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_fused_loss_under_torch_compile_equals_eager():
    """The compiled fused loss (Dynamo traces the autograd.Function, Inductor fuses each chunk) gives
    the eager loss and gradients, to rounding, also once the window length has changed. About 20-40 s
    on 2 cores: the CPU compiles."""
    model, x, y = padded_fused_case()
    compiled = torch.compile(model, fullgraph=True)  # no graph break: the chunk loop compiled
    compiled(x[:, :8], y[:, :8], loss_chunk=7)  # a second window length below makes the length symbolic,
    # as a curriculum does; attention must still take it without a graph break
    results = []
    for forward in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = forward(x, y, loss_chunk=7)[1]
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (eager, g0), (compiled, g1) = results
    assert compiled == pytest.approx(eager, abs=1e-6)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_static_cache_under_autocast_and_a_full_cache(lively_model):
    prompt = tokens((1, 15), 97, 7)  # block_size - 1: the first step fills the last slot
    with torch.autocast("cpu", dtype=torch.bfloat16):  # k, v come out bf16; the cache is fp32
        out = lively_model.generate(prompt, 20, temperature=0, cuda_graph=True)
    assert out.shape == (1, 35)
    decoder = slm_utils.GraphDecoder(lively_model, 1)
    decoder.prefill(prompt)
    decoder.step(prompt[:, -1:])
    with pytest.raises(ConfigError, match="cache is full"):
        decoder.step(prompt[:, -1:])
    with pytest.raises(ConfigError, match="another model or batch size .1 rows; the prompt has 2"):
        lively_model.generate(tokens((2, 3), 97, 8), 4, cuda_graph=decoder)


def test_fused_loss_without_grad_and_under_bf16_autocast():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=97))
    x, y = tokens((2, 16), 97, 3), tokens((2, 16), 97, 4)
    with torch.no_grad():
        assert model(x, y, loss_chunk=5)[1].item() == pytest.approx(model(x, y)[1].item(), abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, fused = model(x, y)[1], model(x, y, loss_chunk=5)[1]
    assert fused.dtype == torch.float32 and fused.item() == pytest.approx(plain.item(), rel=1e-3)


def test_negative_loss_chunk_is_a_config_error():
    with pytest.raises(ConfigError, match="loss_chunk=-1"):
        slm_utils.TrainConfig(loss_chunk=-1)
