#!/usr/bin/env bash
# One entry point for a fresh machine: makes `.venv`, installs the project into it
# with what the job needs (again only when pyproject.toml changed, or when a job needs
# more than is there), then runs what was asked.
#   bash dev.sh demo    Newton solve of the Bratu example on a real local server
#                       (installs the package, its runtime dependencies and matplotlib)
#   bash dev.sh test    the test suite (real servers on 127.0.0.1, and in process)
#   bash dev.sh bench   the benchmarks
#   bash dev.sh docs    the documentation site, into site/ (`bash dev.sh docs serve` to browse)
#   bash dev.sh py312   the drop-in tests and a core subset on Python 3.12 with the newest
#                       JAX, in `.venv312` (skipped, saying so, where no Python 3.12 exists)
# test, bench and docs install the `dev` extra (the linters, the docs toolchain, what
# tesseract-core's examples import); a venv made by `demo` is upgraded by them.
set -euo pipefail
cd "$(dirname "$0")"

# `ensure VENV PYTHON EXTRA`: VENV made with PYTHON, holding the project with EXTRA.
# The stamp says which pyproject.toml (its hash) and which extra were installed; `dev`
# includes the others.
ensure() {
    local venv=$1 python=$2 extra=$3
    if [ ! -x "$venv/bin/python" ]; then
        "$python" -m venv "$venv"
    fi
    local stamp="$venv/.tesseract_lx-installed"
    local hash have
    hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
    have=$(cat "$stamp" 2>/dev/null || true)
    if [ "$have" != "$hash $extra" ] && [ "$have" != "$hash dev" ]; then
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet -e ".[$extra]"
        echo "$hash $extra" > "$stamp"
    fi
}

# The tests in two processes, a file at a time each: one process keeps one of two
# cores busy (it waits on its servers), and a file's servers stay in one process.
# Files go in the order tests/conftest.py gives them (its longest first).
PARALLEL="-n 2 --dist loadfile --no-loadscope-reorder"
job=${1:-demo}
shift || true
case "$job" in
    py312)
        # pyenv's 3.12 where there is one, else any python3.12 on PATH.
        py312=${PYTHON312:-$(PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null \
            || command -v python3.12 || true)}
        if [ -z "$py312" ] || [ ! -x "$py312" ]; then
            echo "dev.sh py312: SKIPPED, no Python 3.12 here (neither pyenv's 3.12.1 nor" \
                "python3.12 on PATH; set PYTHON312=/path/to/python3.12)."
            exit 0
        fi
        ensure .venv312 "$py312" test
        export PATH="$PWD/.venv312/bin:$PATH"
        python -c 'import sys, jax; print(f"Python {sys.version.split()[0]}, jax {jax.__version__}")'
        # The drop-in (tesseract-jax's function, and parity with it) over every
        # transport; the module, the operators and OnServer over `tesseract-lx serve`
        # only (the drop-in covers the stock server, the first leg the in-process
        # transport), on every Tesseract but the Poisson ones (the first leg has
        # them); tesseract-core's examples' apply, JVP and VJP in process.
        upstream="test_upstream.py and inprocess and (test_apply or test_jvp or test_vjp)"
        core="not test_upstream.py and not stock and not inprocess and not poisson"
        exec python -m pytest -q --durations=10 $PARALLEL \
            tests/test_parity.py tests/test_apply.py tests/test_module.py \
            tests/test_operator.py tests/test_onserver.py tests/test_upstream.py \
            -k "test_parity.py or test_apply.py or ($upstream) or ($core)" \
            "$@" ;;
    demo) extra=demo ;;
    test | bench | docs) extra=dev ;;
    *) echo "usage: bash dev.sh {demo|test|bench|docs|py312} [args...]" >&2; exit 2 ;;
esac
ensure .venv "${PYTHON:-python3}" "$extra"
export PATH="$PWD/.venv/bin:$PATH"
case "$job" in
    demo) exec python examples/bratu_newton.py "$@" ;;
    test) ruff check --quiet . && pyright --warnings && exec python -m pytest -q --durations=15 $PARALLEL "$@" ;;
    bench) exec python benchmarks/suite.py "$@" ;;
    docs)
        export NO_MKDOCS_2_WARNING=1
        if [ "${1:-}" = serve ]; then shift; exec mkdocs serve "$@"; fi
        exec mkdocs build --strict "$@" ;;
esac
