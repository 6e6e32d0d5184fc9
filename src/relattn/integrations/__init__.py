"""Bridges from other libraries' models to relattn's attention.

Each bridge imports its library only when used; the core of relattn never imports this package.

- :mod:`relattn.integrations.transformers`: Hugging Face transformers' T5-family, ALiBi and
  Inkling-family models run their attention through :func:`relattn.attention`.
"""

__all__: list[str] = []
