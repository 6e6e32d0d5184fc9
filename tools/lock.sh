#!/usr/bin/env bash
# Print requirements/lock.txt from the environment of the python given as $1: every installed
# distribution but relattn itself and pip, torch without its local "+cpu" tag (the constraint
# then matches the CPU wheel and the plain one alike).
set -euo pipefail
python="$1"
cat <<'TXT'
# The versions `make test` installs (pip constraints: a pin applies only to a package the
# project's extras pull in). Written by `make lock` from the newest releases pyproject.toml
# allows; see CONTRIBUTING.md ("Dependencies") for how to refresh it. Users are not bound by
# it: pyproject.toml keeps the package's own ranges loose.
TXT
"$python" -m pip freeze --all --exclude-editable --disable-pip-version-check \
  | grep -vE '^(relattn|pip)==' \
  | sed -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$/\1/' \
  | LC_ALL=C sort -f
