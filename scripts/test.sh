#!/usr/bin/env bash
# Run bkdbg's test suite against the local BuildKit.
#
# usage: scripts/test.sh [PYTEST_ARGS...]
# Starts the local BuildKit (scripts/local-buildkit.sh start), then runs pytest from the
# repository root with every argument passed through, so test paths are relative to that
# root. The interpreter is $PYTHON if set,
# else .venv/bin/python, else python3. The exit code is pytest's, except that pytest's
# 5 (no tests collected) becomes 1, so an empty selection does not pass.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

if [ -n "${PYTHON:-}" ]; then
    python=$PYTHON
elif [ -x .venv/bin/python ]; then
    python=.venv/bin/python
else
    python=python3
fi

scripts/local-buildkit.sh start
eval "$(scripts/local-buildkit.sh env)"
# tests read only BKDBG_TEST_ADDR, and conftest.py clears BUILDKIT_HOST for each test
export BKDBG_TEST_ADDR
# the engine that this script started is ours to stop and start in the restart tests
export BKDBG_TEST_RESTART=1

# Many tests start bkdbg processes. Where PYTHONDONTWRITEBYTECODE is set, each of them
# would compile bkdbg's modules from source again, which a regular install never does.
"$python" -m compileall -q bkdbg

status=0
"$python" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    status=1
fi
exit "$status"
