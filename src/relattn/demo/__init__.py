"""The text-model pipeline behind ``relattn train``, ``generate``, ``explain --checkpoint`` and
``relattn demo`` (train short, test long).

- :mod:`.data` — the corpus (a file, a folder, or the stdlib), split by file; training batches
  and evaluation windows
- :mod:`.trainer` — the resumable training loop; one TinyLM per encoding
- :mod:`.evaluate` — held-out perplexity at growing lengths
- :mod:`.sample` — streaming generation with the KV cache
- :mod:`.probe` — learned tables, a layer's q/k/v and every head's attention weights
- :mod:`.model_folders` — loading a model folder for a command; saving a training run for
  ``--resume`` and a model without torn folders (the folder format itself is
  :mod:`relattn.models.checkpoint`)
- :mod:`.report` — results.json, report.md / report.html and the summary
- :mod:`.experiment` — the whole demo, saved model by model, locked, resumable
"""
