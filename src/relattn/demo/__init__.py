"""The ``relattn demo`` pipeline: train short, test long.

- :mod:`.data` — the corpus, split by file; training batches and evaluation windows
- :mod:`.train` — one TinyLM per encoding
- :mod:`.evaluate` — held-out perplexity at growing lengths
- :mod:`.probe` — learned tables and attention weights of a trained model
- :mod:`.plots`, :mod:`.report` — the PNGs, report.md / report.html, results.json
- :mod:`.experiment` — the whole run, saved model by model and resumable
"""
