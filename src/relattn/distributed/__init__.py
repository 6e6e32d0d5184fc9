"""Context parallelism: one sequence sharded across the processes of a torch.distributed group.

- :func:`context_parallel_attention`: exact attention over the whole sequence from each rank's
  shard, by a ring of key/value blocks or by an all-to-all head split.
- :func:`shard`, :func:`unshard`, :func:`shard_positions`: the shard layout
  (:mod:`relattn.distributed.layout`).
- :class:`ContextParallel`: the group, strategy and layout, for layers and models.

See docs/context-parallel.md for the layout, the gradient recipe and the scaling model.
"""

from .api import STRATEGIES, ContextParallel, context_parallel_attention
from .layout import LAYOUTS, shard, shard_positions, unshard

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "ContextParallel",
    "context_parallel_attention",
    "shard",
    "shard_positions",
    "unshard",
]
