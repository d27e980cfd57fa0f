"""A plain GPT, written the straightforward way, to measure slm_utils.GPT against.

This is how a first small-GPT notebook is usually written: one module per attention head with
its own key / query / value layers, attention as an explicit masked softmax against a
registered lower-triangular buffer, the heads concatenated, ``nn.CrossEntropyLoss`` on the full
logits, PyTorch's default (non-fused) AdamW, and batches stacked one window at a time from the
memmap. It is pre-norm with tied embeddings, like slm_utils.GPT, so both compute the same
function with the same number of parameters (``load_from_slm`` copies one into the other, and
the benchmark checks that their outputs agree). Only the way the work is done differs.

Nothing here is tuned; that is the point.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class RefConfig:
    vocab_size: int = 50257
    block_size: int = 128
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.1
    bias: bool = True

    @classmethod
    def like(cls, cfg) -> "RefConfig":
        """The same shape as a slm_utils.GPTConfig (its vocabulary padding is not copied)."""
        return cls(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.bias)


class Head(nn.Module):
    """One head of causal self-attention."""

    def __init__(self, cfg: RefConfig, head_size: int):
        super().__init__()
        self.key = nn.Linear(cfg.n_embd, head_size, bias=cfg.bias)
        self.query = nn.Linear(cfg.n_embd, head_size, bias=cfg.bias)
        self.value = nn.Linear(cfg.n_embd, head_size, bias=cfg.bias)
        self.register_buffer("tril", torch.tril(torch.ones(cfg.block_size, cfg.block_size)))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        wei = F.softmax(wei, dim=-1)
        wei = self.dropout(wei)
        v = self.value(x)  # (B, T, hs)
        return wei @ v  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        head_size = cfg.n_embd // cfg.n_head
        self.heads = nn.ModuleList([Head(cfg, head_size) for _ in range(cfg.n_head)])
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)  # (B, T, C)
        return self.dropout(self.proj(out))


class FeedForward(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.sa = MultiHeadAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.ffwd = FeedForward(cfg)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


class ReferenceGPT(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embedding = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # weight tying
        self.loss_fn = nn.CrossEntropyLoss()
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        tok = self.token_embedding(idx)  # (B, T, C)
        pos = self.position_embedding(torch.arange(T, device=idx.device))  # (T, C)
        x = self.drop(tok + pos)
        x = self.blocks(x)
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = self.loss_fn(logits.view(B * T, -1), targets.view(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int):
        """Greedy decoding the plain way: every token re-reads the last block_size tokens in full."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, next_id], dim=1)
        return idx


@torch.no_grad()
def load_from_slm(ref: ReferenceGPT, slm) -> ReferenceGPT:
    """Copy a slm_utils.GPT's weights into ``ref`` (fused qkv split into per-head layers)."""
    cfg = ref.config
    hs = cfg.n_embd // cfg.n_head
    t = slm.transformer
    ref.token_embedding.weight.copy_(t.wte.weight[:cfg.vocab_size])
    ref.position_embedding.weight.copy_(t.wpe.weight)
    for rb, sb in zip(ref.blocks, t.h):
        rb.ln1.load_state_dict(sb.ln_1.state_dict())
        rb.ln2.load_state_dict(sb.ln_2.state_dict())
        w, b = sb.attn.c_attn.weight, sb.attn.c_attn.bias  # (3C, C): q rows, then k, then v
        for i, head in enumerate(rb.sa.heads):
            for j, lin in enumerate((head.query, head.key, head.value)):
                rows = slice(j * cfg.n_embd + i * hs, j * cfg.n_embd + (i + 1) * hs)
                lin.weight.copy_(w[rows])
                if b is not None:
                    lin.bias.copy_(b[rows])
        rb.sa.proj.load_state_dict(sb.attn.c_proj.state_dict())
        rb.ffwd.net[0].load_state_dict(sb.mlp.c_fc.state_dict())
        rb.ffwd.net[2].load_state_dict(sb.mlp.c_proj.state_dict())
    ref.ln_f.load_state_dict(t.ln_f.state_dict())
    return ref


def make_optimizer(model: nn.Module, lr: float = 1e-4):
    """The optimizer as a first notebook writes it: PyTorch's default AdamW over every parameter."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-9)


def make_batch_loader(data_dir, batch_size: int, block_size: int, device, generator: torch.Generator):
    """Random windows stacked one at a time from a freshly opened memmap, then ``.to(device)``."""
    path = Path(data_dir) / "train.bin"

    def get_batch():
        data = np.memmap(path, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
        return x.to(device), y.to(device)

    return get_batch


def make_train_step(model: ReferenceGPT, optimizer, get_batch, device, dtype: torch.dtype, grad_clip: float = 0.5):
    """One micro-batch and one optimizer step, as the notebook's loop does them."""
    device = torch.device(device)
    ctx = (contextlib.nullcontext() if dtype == torch.float32
           else torch.autocast(device_type=device.type, dtype=dtype))
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16 and device.type == "cuda"))
    model.train()

    def step():
        X, Y = get_batch()
        with ctx:
            _, loss = model(X, Y)
        scaler.scale(loss).backward()
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = ["RefConfig", "ReferenceGPT", "load_from_slm", "make_optimizer", "make_batch_loader",
           "make_train_step", "count_parameters"]
