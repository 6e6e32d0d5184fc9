"""Command-line tools: ``relattn explain | train | generate | demo | bench``.

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args)``. What they share is
one small module an idea: argument types and ``--seed`` (``_args``), ``--pe`` and the encoding
parameters from the registry (``_pe_flags``), torch threads (``_threads``) and output paths
checked before any work (``_paths``). What the text-model pipeline (:mod:`relattn.demo`) shares
with them lies below both: the user-error type (:mod:`relattn._errors`), atomic writes and the
folder lock (:mod:`relattn._io`) and the progress bar (:mod:`relattn._progress`).
"""
