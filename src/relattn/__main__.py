"""``python -m relattn`` is the ``relattn`` command."""

import sys

from relattn.cli.main import main

sys.exit(main())
