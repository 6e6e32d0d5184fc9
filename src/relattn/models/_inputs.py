"""Checks of what a caller hands TinyLM: token ids, a cache, generate's sampling arguments."""

from __future__ import annotations

import torch
from torch import Tensor

from .._validate import INT64_MAX, check_float, check_int, check_optional_int, is_integer_dtype
from ..cache import KVCache
from .config import TinyLMConfig


def token_ids(
    name: str, idx, config: TinyLMConfig, device: torch.device, shapes: str = "(B, N)"
) -> Tensor:
    """``idx`` as int64 ids after checking type, shape ``(B, N)``, dtype, device and range.

    Any integer dtype is accepted. The range check reads the values (a device sync); while
    ``torch.compile`` traces, where that would break the graph, it is an asynchronous assert
    instead (a RuntimeError naming the argument and the range, not the values).
    """
    if not isinstance(idx, Tensor):
        raise TypeError(
            f"{name} must be a {shapes} integer torch.Tensor of token ids; got "
            f"{type(idx).__name__} (e.g. torch.tensor(ids))"
        )
    if idx.dim() != 2:
        raise ValueError(f"{name} must have shape (B, N); got {tuple(idx.shape)}")
    if not is_integer_dtype(idx.dtype):
        raise TypeError(f"{name} must be an integer tensor of token ids; got dtype {idx.dtype}")
    if idx.numel() == 0:
        raise ValueError(f"{name} must hold at least one token; got shape {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} must be on the model's device {device}; got {idx.device}")
    if idx.dtype not in (torch.int32, torch.int64):
        idx = idx.long()  # nn.Embedding takes int32 and int64 only
    if torch.compiler.is_compiling():
        # Reading the values would break the graph; an asynchronous assert stays in it. (The
        # embedding's own bounds check alone is not enough: inside a parallel region of the
        # compiled CPU code it aborts the process rather than raising.)
        torch._assert_async(
            ((idx >= 0) & (idx < config.vocab_size)).all(),
            f"{name} must be token ids in [0, vocab_size={config.vocab_size})",
        )
    else:
        lo, hi = (int(t) for t in torch.aminmax(idx))
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(
                f"{name} must be token ids in [0, vocab_size={config.vocab_size}); "
                f"got values in [{lo}, {hi}]"
            )
    return idx


def prompt(prompt_ids, config: TinyLMConfig, device: torch.device) -> tuple[Tensor, bool]:
    """generate's prompt as ``(B, N)`` int64 ids on ``device``, and whether it came as ``(N,)``."""
    single = isinstance(prompt_ids, Tensor) and prompt_ids.dim() == 1
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dim() not in (1, 2):
            raise ValueError(
                f"prompt_ids must have shape (B, N) or (N,); got {tuple(prompt_ids.shape)}"
            )
        prompt_ids = (prompt_ids[None] if single else prompt_ids).to(device)
    idx = token_ids("prompt_ids", prompt_ids, config, device, shapes="(B, N) or (N,)")
    return idx.long(), single


def check_cache(cache, config: TinyLMConfig, batch_size: int, weight: Tensor) -> None:
    """Raise unless ``cache`` is a KVCache this model can use for a batch of ``batch_size``."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache (model.new_cache); got {type(cache).__name__}")
    first = cache.layer(0)
    built = (cache.num_layers, first.num_kv_heads, first.head_dim)
    wanted = (config.num_layers, config.num_kv_heads or config.num_heads, config.head_dim)
    if built != wanted:
        raise ValueError(
            f"cache has (num_layers, num_kv_heads, head_dim) = {built}; the model needs "
            f"{wanted} (use model.new_cache)"
        )
    if cache.batch_size != batch_size:
        raise ValueError(
            f"cache was built for batch_size={cache.batch_size}; idx has B={batch_size}"
        )
    if cache.dtype != weight.dtype or cache.device != weight.device:
        raise ValueError(
            f"cache holds {cache.dtype} on {cache.device}; the model is {weight.dtype} on "
            f"{weight.device} (use model.new_cache after moving the model)"
        )


def sampling_args(max_new_tokens, temperature, top_k, seed) -> tuple[int, float, int | None]:
    """generate's arguments checked: ``(max_new_tokens, temperature, top_k)``."""
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, min=0)
    temperature = check_float("temperature", temperature, min=0.0)
    top_k = check_optional_int("top_k", top_k, min=1)
    check_optional_int("seed", seed, min=0, max=INT64_MAX)
    return max_new_tokens, temperature, top_k
