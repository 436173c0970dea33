#!/usr/bin/env bash
# One entry point for a fresh machine: makes `.venv`, installs the project into it
# (again only when pyproject.toml changed), then runs what was asked.
#   bash dev.sh demo    Newton solve of the Bratu example on a real local server
#   bash dev.sh test    the test suite (real servers on 127.0.0.1, and in process)
#   bash dev.sh bench   the benchmarks
#   bash dev.sh docs    the documentation site, into site/ (`bash dev.sh docs serve` to browse)
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.tesseract_lx-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
job=${1:-demo}
shift || true
case "$job" in
    demo) exec python examples/bratu_newton.py "$@" ;;
    test) ruff check --quiet . && pyright --warnings && exec python -m pytest -q --durations=15 "$@" ;;
    bench) exec python benchmarks/suite.py "$@" ;;
    docs)
        export NO_MKDOCS_2_WARNING=1
        if [ "${1:-}" = serve ]; then shift; exec mkdocs serve "$@"; fi
        exec mkdocs build --strict "$@" ;;
    *) echo "usage: bash dev.sh {demo|test|bench|docs} [args...]" >&2; exit 2 ;;
esac
