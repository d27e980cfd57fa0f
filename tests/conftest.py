"""Shared fixtures: small corpora built by the tests themselves, prepared once per session."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import slm_utils  # noqa: E402


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory) -> Path:
    """The embedded corpus tokenized once: ~1.5M tokens in train.bin / val.bin."""
    data_dir = tmp_path_factory.mktemp("shakespeare")
    slm_utils.prepare_data("shakespeare", data_dir, num_workers=2)
    return data_dir


@pytest.fixture
def tiny_config() -> slm_utils.GPTConfig:
    """A model small enough to train in well under a second per step on a CPU."""
    return slm_utils.GPTConfig(vocab_size=50257, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
