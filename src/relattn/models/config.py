"""TinyLMConfig: the hyperparameters of a TinyLM, checked when built (and again by TinyLM)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import backends
from .. import pe as encodings
from .._validate import check_bool, check_choice, check_float, check_int, check_optional_int

__all__ = ["TinyLMConfig"]

_POSITIVE_INTS = ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_ratio", "max_seq_len")


@dataclass
class TinyLMConfig:
    """Hyperparameters of a :class:`relattn.models.TinyLM`.

    Attributes:
        vocab_size: V (256: one token per byte).
        d_model: model width; a multiple of ``num_heads``.
        num_layers: transformer blocks.
        num_heads: query heads H; head dim ``D = d_model / H``.
        num_kv_heads: key/value heads (GQA), dividing H; None means H.
        pe: ``"none"`` or a name from :func:`relattn.pe.names` (``"rope"``: RoPE only;
            ``"inkling"``, ``"fox"``: the terms the tokens set, each layer projecting its own).
        rope: also rotate q and k by RoPE (needs an even head dim).
        mlp_ratio: MLP hidden width / d_model.
        dropout: in ``[0, 1)``, on the embedding and each residual branch.
        max_seq_len: default KV-cache capacity for :meth:`TinyLM.generate`; not a limit on
            ``forward``.
        backend: attention backend, a name from :func:`relattn.backends.names`.

    Every field is checked on construction (``TypeError`` for a wrong type, ``ValueError`` for a
    wrong value, each naming ``config.<field>``); :meth:`validate` checks again after edits.
    """

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    pe: str = "t5"
    rope: bool = False
    mlp_ratio: int = 4
    dropout: float = 0.0
    max_seq_len: int = 4096
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``TypeError`` or ``ValueError`` naming the first bad field."""
        for name in _POSITIVE_INTS:
            check_int(f"config.{name}", getattr(self, name), min=1)
        check_optional_int("config.num_kv_heads", self.num_kv_heads, min=1)
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
        check_choice("config.pe", self.pe, ["none", *encodings.names()])
        check_bool("config.rope", self.rope)
        if (self.rope or self.pe == "rope") and self.head_dim % 2:
            raise ValueError(
                f"config.rope (and pe='rope') need an even head dim; d_model / num_heads = "
                f"{self.head_dim}"
            )
        check_float("config.dropout", self.dropout, min=0.0, max=1.0, max_open=True)
        check_choice("config.backend", self.backend, backends.names())

    @property
    def head_dim(self) -> int:
        """D = d_model / num_heads."""
        return self.d_model // self.num_heads
