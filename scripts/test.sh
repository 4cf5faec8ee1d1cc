#!/usr/bin/env bash
# Everything CI checks, in order: environment, generated stubs and docs, proto lint, ruff, mypy, pytest.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m "not slow" -k kit`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/ensure_postgres.sh
bin=${OPENLORA_VENV:-.venv}/bin

echo "==> generated stubs are up to date"
"$bin/python" scripts/gen_protos.py --check
echo "==> configuration reference is up to date"
"$bin/python" scripts/gen_config_reference.py --check
echo "==> proto lint"
"$bin/python" scripts/lint_protos.py
echo "==> ruff"
"$bin/ruff" check .
"$bin/ruff" format --check .
echo "==> mypy"
"$bin/mypy"
echo "==> pytest"
"$bin/pytest" "$@"
