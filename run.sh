#!/usr/bin/env bash
# One entry point for users and CI: creates and fills .venv on first use, then runs a command.
#   ./run.sh paper [--duration S] [--config PATH] [--summary PATH]   paper trading on the sim feed
#   ./run.sh test                 lint, type-check and the test suite
#   ./run.sh bench [--quick] [--json PATH]
#   ./run.sh monitor [--once] [--json]
#   ./run.sh live|backtest|terminal ...   (hft subcommands)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"

pick_python() {
    for p in python3.11 python3.12 python3.13 python3; do
        if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "$p"; return 0
        fi
    done
    echo "run.sh: Python >= 3.11 is required" >&2; return 1
}

bootstrap() {
    local stamp="$VENV/.installed" want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "run.sh: creating $VENV" >&2
        "$(pick_python)" -m venv "$VENV"
    fi
    echo "run.sh: installing the project and its dependencies into .venv" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev,train]" >&2
    echo "$want" > "$stamp"
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case "$cmd" in
    paper|live|backtest)
        bootstrap
        exec "$VENV/bin/hft" "$cmd" "$@"
        ;;
    test)
        bootstrap
        "$VENV/bin/ruff" check shm stages ops benchmarks tests
        "$VENV/bin/ruff" format --check shm stages ops benchmarks tests
        "$VENV/bin/mypy"
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    bench)
        bootstrap
        exec "$VENV/bin/python" -m benchmarks "$@"
        ;;
    monitor|terminal)
        bootstrap
        exec "$VENV/bin/hft" "$cmd" "$@"
        ;;
    ""|-h|--help|help)
        sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
        ;;
    *)
        echo "run.sh: unknown command '$cmd' (expected paper, live, backtest, test, bench, monitor, terminal)" >&2
        exit 2
        ;;
esac
