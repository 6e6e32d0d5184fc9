"""Pages other parts of the project contribute join the navigation when their file exists
(docs/design.md, docs/huggingface.md, docs/context-parallel.md), so the site builds with or
without them and links to each as soon as it is there."""

from __future__ import annotations

from pathlib import Path

OPTIONAL = [
    ("How-to guides", "Hugging Face models", "huggingface.md"),
    ("How-to guides", "Context parallelism", "context-parallel.md"),
    (None, "Design", "design.md"),
]


def on_config(config, **kwargs):
    docs = Path(config["docs_dir"])
    nav = config["nav"]
    for section, title, file in OPTIONAL:
        if not (docs / file).is_file():
            continue
        entry = {title: file}
        target = nav
        if section is not None:
            target = next(
                item[section] for item in nav if isinstance(item, dict) and section in item
            )
        target.append(entry)
    return config
