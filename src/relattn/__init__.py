"""relattn: exact, fast, memory-light causal attention with relative position encodings.

The public surface: :func:`attention` and :func:`attention_weights` (in
:mod:`relattn.functional`), the encodings in :mod:`relattn.pe`, the layer in :mod:`relattn.nn`,
:class:`KVCache`, the small model in :mod:`relattn.models`, and the backend registry in
:mod:`relattn.backends`. Design: docs/design.md.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from . import backends, models, nn, pe
from .cache import KVCache
from .functional import attention, attention_weights
from .problem import Problem

try:
    __version__ = _version("relattn")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "KVCache",
    "Problem",
    "__version__",
    "attention",
    "attention_weights",
    "backends",
    "models",
    "nn",
    "pe",
]
