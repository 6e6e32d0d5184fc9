"""Command-line tools: ``relattn explain | demo | bench``."""
