"""Command-line tools: ``relattn explain | train | generate | demo | bench``.

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args)``; what they share
(the user-error type, argument checks, encodings from the registry, threads, safe files, the
folder lock, the progress bar) is in :mod:`relattn.cli._common`.
"""
