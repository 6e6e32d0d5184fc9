"""TinyLM: a small decoder-only language model whose only position signal is relative.

    x = Embed(idx)                                  (no absolute position embedding)
    for each block:  x = x + Attn(Norm(x));  x = x + MLP(Norm(x))
    logits = Norm(x) · Embedᵀ                        (tied output head)

Each block has its own encoding module. The original T5 shares one bucket table across layers;
per-layer tables cost ``H × buckets`` parameters a layer and let each layer learn its own
distance profile, as ALiBi (fixed per head) and KERPLE (learned per layer) do.

The config and its checks live in :mod:`.config`, argument checks in :mod:`._inputs`, checkpoint
files in :mod:`.checkpoint`, token sampling in :mod:`.sampling`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import KVCache
from ..nn import RelativeSelfAttention
from . import _inputs, checkpoint
from .config import TinyLMConfig
from .sampling import sample_next

__all__ = ["TinyLM", "TinyLMConfig"]


class MLP(nn.Module):
    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(Norm(x))``, then ``x + MLP(Norm(x))``."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attn = RelativeSelfAttention(
            config.d_model,
            config.num_heads,
            config.num_kv_heads,
            pe=config.pe,
            rope=config.rope,
            dropout=config.dropout,
            backend=config.backend,
        )
        self.norm2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache=None, **masks) -> Tensor:
        x = x + self.attn(self.norm1(x), cache=cache, **masks)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """A small causal LM with relative positions only. See :class:`TinyLMConfig`."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        if not isinstance(config, TinyLMConfig):
            raise TypeError(f"config must be a TinyLMConfig; got {type(config).__name__}")
        config.validate()  # fields may have been edited since construction
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's scheme; residual projections scaled by 1/√(2L). Encodings keep their own init,
        # and so do the projections of the terms the tokens set (r_proj, gate_proj: the gate's
        # bias starts gates near 1).
        own = {
            id(p)
            for block in cast("Iterable[Block]", self.blocks)
            for p in (block.attn.r_proj, block.attn.gate_proj)
            if p is not None
        }
        for module in self.modules():
            if id(module) in own:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in cast("Iterable[Block]", self.blocks):
            for proj in (block.attn.out_proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.config.num_layers))

    def forward(
        self,
        idx: Tensor,
        *,
        cache: KVCache | None = None,
        doc_ids: Tensor | None = None,
        window: int | None = None,
        key_padding_mask: Tensor | None = None,
        context_parallel=None,
    ) -> Tensor:
        """Next-token logits.

        Args:
            idx: ``(B, N)`` token ids in ``[0, vocab_size)``, any integer dtype; the range is
                checked (under ``torch.compile`` by an asynchronous assert, which keeps the
                graph whole and reports the range but not the offending values).
            cache: a cache from :meth:`new_cache`; ``idx`` continues the cached sequence.
            doc_ids, window, key_padding_mask: as :class:`relattn.nn.RelativeSelfAttention`
                (``(B, N)`` for the new tokens).
            context_parallel: a :class:`relattn.distributed.ContextParallel`; ``idx`` (and the
                masks) are then this rank's shard of the sequence.

        Returns:
            ``(B, N, vocab_size)`` logits.
        """
        idx = _inputs.token_ids("idx", idx, self.config, self.embed.weight.device)
        if cache is not None:
            _inputs.check_cache(cache, self.config, idx.shape[0], self.embed.weight)
        x = self.dropout(self.embed(idx))
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layer(i) if cache is not None else None
            x = block(
                x,
                cache=layer_cache,
                doc_ids=doc_ids,
                window=window,
                key_padding_mask=key_padding_mask,
                context_parallel=context_parallel,
            )
        return F.linear(self.norm(x), self.embed.weight)

    def new_cache(
        self, batch_size: int, capacity: int | None = None, window: int | None = None
    ) -> KVCache:
        """An empty KV cache for this model, on its device and in its dtype.

        Args:
            batch_size: B.
            capacity: most positions the sequence may reach; default ``config.max_seq_len``.
            window: sliding window W (only the last ``W - 1`` positions are stored; forward
                calls with this cache then use window W).
        """
        c = self.config
        weight = self.embed.weight
        return KVCache(
            c.num_layers,
            batch_size,
            c.num_kv_heads or c.num_heads,
            c.head_dim,
            c.max_seq_len if capacity is None else capacity,
            dtype=weight.dtype,
            device=weight.device,
            window=window,
        )

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> Tensor:
        """Sample a continuation with the KV cache: one prefill, then one token at a time.

        Runs in eval mode (dropout off) and restores the previous mode afterwards.

        Args:
            prompt_ids: ``(B, N)`` or ``(N,)`` integer tensor (any integer dtype, any device) of
                ids in ``[0, vocab_size)``, ``N >= 1``. Text must be encoded first, e.g.
                ``torch.tensor(list("hi".encode()))`` for the byte-level default.
            max_new_tokens: tokens to add (``>= 0``); ``N + max_new_tokens`` may not exceed
                ``config.max_seq_len``.
            temperature: finite, ``>= 0``: sampling from ``softmax(logits / temperature)``;
                ``0`` is greedy (argmax), and tiny values approach it without overflow.
            top_k: sample among the ``top_k`` most likely tokens only (clipped to the vocab).
            seed: in ``[0, 2**63)``; seeds a private ``torch.Generator`` (the global RNG is used
                when None).

        Returns:
            int64 ``(B, N + max_new_tokens)`` or ``(N + max_new_tokens,)`` on the model's
            device: the prompt then the new ids.
        """
        max_new_tokens, temperature, top_k = _inputs.sampling_args(
            max_new_tokens, temperature, top_k, seed
        )
        device = self.embed.weight.device
        idx, single = _inputs.prompt(prompt_ids, self.config, device)
        b, n = idx.shape
        total = n + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(
                f"prompt length {n} + max_new_tokens={max_new_tokens} = {total} exceeds "
                f"config.max_seq_len={self.config.max_seq_len}"
            )
        out = [idx]
        if max_new_tokens > 0:
            generator = None
            if seed is not None:
                generator = torch.Generator(device=device).manual_seed(seed)
            was_training = self.training
            self.eval()
            try:
                cache = self.new_cache(b, capacity=total - 1)
                logits = self(idx, cache=cache)[:, -1]
                for step in range(max_new_tokens):
                    token = sample_next(logits, temperature, top_k, generator)  # (B, 1)
                    out.append(token)
                    if step + 1 < max_new_tokens:
                        logits = self(token, cache=cache)[:, -1]
            finally:
                self.train(was_training)
        result = torch.cat(out, dim=1)
        return result[0] if single else result

    def save(self, path: str | os.PathLike) -> None:
        """Write the checkpoint folder ``path``: ``config.json`` and ``model.safetensors``.

        The folder is replaced atomically (see :mod:`relattn.models.checkpoint`): a failure or a
        kill at any point leaves the previous checkpoint there, intact, or the new one,
        complete. ``path`` must be new, empty, or a previous checkpoint (holding only those two
        files); parents are created.
        """
        checkpoint.write_checkpoint(path, self.config, self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> TinyLM:
        """Load a model written by :meth:`save` (on CPU, in the saved dtypes).

        Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a config with
        missing or unknown fields, weights that do not match it (missing, unexpected or
        misshapen tensors, or weights saved with a different config) or a truncated file.
        """
        config, tensors = checkpoint.read_checkpoint(path)
        model = cls(config)
        checkpoint.check_state(tensors, model.state_dict(), Path(path) / checkpoint.WEIGHTS_FILE)
        dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if len(dtypes) == 1:  # buffers outside the state dict follow the weights' dtype
            model = model.to(dtypes.pop())
        model.load_state_dict(tensors, strict=True, assign=True)  # assign: keep saved dtypes
        return model

    def num_parameters(self) -> int:
        """Number of parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())
