"""TinyLM: a small decoder-only language model whose only position signal is relative.

    x = Embed(idx)                                  (no absolute position embedding)
    for each block:  x = x + Attn(Norm(x));  x = x + MLP(Norm(x))
    logits = Norm(x) · Embedᵀ                        (tied output head)

Each block has its own encoding module. The original T5 shares one bucket table across layers;
per-layer tables cost ``H × buckets`` parameters a layer and let each layer learn its own
distance profile, as ALiBi (fixed per head) and KERPLE (learned per layer) do.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends
from ..cache import KVCache
from ..nn import ENCODINGS, RelativeSelfAttention

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class TinyLMConfig:
    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    pe: str = "t5"  # "none" | "t5" | "alibi" | "kerple" | "offset"
    rope: bool = False
    mlp_ratio: int = 4
    dropout: float = 0.0
    max_seq_len: int = 4096  # default KV-cache capacity for generate(); not a limit on forward
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "mlp_ratio",
            "max_seq_len",
        ):
            _positive(f"config.{name}", getattr(self, name))
        if self.num_kv_heads is not None:
            _positive("config.num_kv_heads", self.num_kv_heads)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"config.d_model must be a multiple of config.num_heads; got "
                f"d_model={self.d_model}, num_heads={self.num_heads}"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config.num_kv_heads must divide config.num_heads; got "
                f"num_kv_heads={self.num_kv_heads}, num_heads={self.num_heads}"
            )
        if self.pe not in ENCODINGS:
            raise ValueError(f"config.pe must be one of {ENCODINGS}; got {self.pe!r}")
        if not isinstance(self.rope, bool):
            raise TypeError(f"config.rope must be a bool; got {self.rope!r}")
        if self.rope and (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"config.rope needs an even head dim; d_model / num_heads = "
                f"{self.d_model // self.num_heads}"
            )
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"config.dropout must be a float in [0, 1); got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"config.dropout must be in [0, 1); got {dropout!r}")
        if self.backend not in backends.names():
            raise ValueError(
                f"config.backend must be one of {backends.names()}; got {self.backend!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


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
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's scheme; residual projections scaled by 1/√(2L). Encodings keep their own init.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
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
            idx: ``(B, N)`` int64 token ids in ``[0, vocab_size)``.
            cache: a cache from :meth:`new_cache`; ``idx`` continues the cached sequence.
            doc_ids, window, key_padding_mask: as :class:`relattn.nn.RelativeSelfAttention`
                (``(B, N)`` for the new tokens).
            context_parallel: a :class:`relattn.distributed.ContextParallel`; ``idx`` (and the
                masks) are then this rank's shard of the sequence.

        Returns:
            ``(B, N, vocab_size)`` logits.
        """
        self._check_ids("idx", idx)
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache; got {type(cache).__name__}")
            if cache.num_layers != self.config.num_layers:
                raise ValueError(
                    f"cache has {cache.num_layers} layers; the model has "
                    f"{self.config.num_layers} (use model.new_cache)"
                )
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
            prompt_ids: ``(B, N)`` or ``(N,)`` int64 ids, ``N >= 1``.
            max_new_tokens: tokens to add (``>= 0``); ``N + max_new_tokens`` may not exceed
                ``config.max_seq_len``.
            temperature: ``> 0`` divides the logits; ``0`` is greedy (argmax).
            top_k: sample among the ``top_k`` most likely tokens only (clipped to the vocab).
            seed: seeds a private ``torch.Generator`` (the global RNG is used when None).

        Returns:
            ``(B, N + max_new_tokens)`` or ``(N + max_new_tokens,)``: the prompt then the new ids.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int; got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float >= 0; got {temperature!r}")
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite float >= 0; got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise TypeError(f"top_k must be None or an int >= 1; got {top_k!r}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None or an int >= 1; got {top_k}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be None or an int; got {seed!r}")
        if not isinstance(prompt_ids, Tensor) or prompt_ids.dim() not in (1, 2):
            got = tuple(prompt_ids.shape) if isinstance(prompt_ids, Tensor) else prompt_ids
            raise ValueError(f"prompt_ids must have shape (B, N) or (N,); got {got!r}")
        single = prompt_ids.dim() == 1
        idx = prompt_ids[None] if single else prompt_ids
        self._check_ids("prompt_ids", idx)
        idx = idx.to(self.embed.weight.device)
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
                generator = torch.Generator(device=idx.device).manual_seed(seed)
            was_training = self.training
            self.eval()
            try:
                cache = self.new_cache(b, capacity=total - 1)
                logits = self(idx, cache=cache)[:, -1]
                for step in range(max_new_tokens):
                    token = _sample(logits, temperature, top_k, generator)  # (B, 1)
                    out.append(token)
                    if step + 1 < max_new_tokens:
                        logits = self(token, cache=cache)[:, -1]
            finally:
                self.train(was_training)
        result = torch.cat(out, dim=1)
        return result[0] if single else result

    def save(self, path: str | Path) -> None:
        """Write ``path/model.safetensors`` and ``path/config.json`` (creates the directory)."""
        save_file, _ = _safetensors()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        tensors = {k: t.detach().cpu().contiguous() for k, t in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def load(cls, path: str | Path) -> TinyLM:
        """Load a model written by :meth:`save` (on CPU, in the saved dtype)."""
        _, load_file = _safetensors()
        path = Path(path)
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        for p in (config_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"no TinyLM at {str(path)!r}: {p.name} is missing (expected a directory "
                    f"written by TinyLM.save with {CONFIG_FILE} and {WEIGHTS_FILE})"
                )
        config = _read_config(config_path)
        try:
            tensors = load_file(str(weights_path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from e
        model = cls(config)
        dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if len(dtypes) == 1:
            model = model.to(dtypes.pop())
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{weights_path} does not match {config_path}: {e}") from e
        return model

    def num_parameters(self) -> int:
        """Number of parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _check_ids(self, name: str, idx) -> None:
        if not isinstance(idx, Tensor) or idx.dim() != 2:
            got = tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"{name} must be a (B, N) tensor of token ids; got {got}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor; got dtype {idx.dtype}")
        if idx.numel() == 0:
            raise ValueError(f"{name} must not be empty; got shape {tuple(idx.shape)}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"{name} must be in [0, vocab_size={self.config.vocab_size}); "
                f"got values in [{lo}, {hi}]"
            )


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    """One token per row from ``(B, V)`` logits; returns ``(B, 1)`` int64."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def _read_config(config_path: Path) -> TinyLMConfig:
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{config_path} must hold a JSON object; got {type(data).__name__}")
    known = {f.name for f in fields(TinyLMConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{config_path} has unknown TinyLMConfig fields {unknown}")
    try:
        return TinyLMConfig(**data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path} is not a valid TinyLMConfig: {e}") from e


def _safetensors():
    try:
        from safetensors.torch import load_file, save_file
    except ImportError as e:
        raise ImportError(
            "TinyLM.save/load need the safetensors package: pip install 'relattn[models]'"
        ) from e
    return save_file, load_file


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
