# The two commands of the README, plus the chores behind them. Each target sets up .venv as needed.
.PHONY: demo test protos lint venv

demo: venv
	.venv/bin/openlora demo

test:
	scripts/test.sh

venv:
	scripts/bootstrap.sh

# Regenerate the gRPC stubs after editing protos/ (CI fails while they are stale).
protos: venv
	.venv/bin/python scripts/gen_protos.py
	.venv/bin/python scripts/lint_protos.py

lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
