# Two commands matter: `make demo` and `make test`. Both set up .venv on first use.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.mmfeat-installed
export PREFECT_HOME ?= $(CURDIR)/.prefect
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first, from the local wheels, so no resolver ever pulls another build
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/mmfeat --workspace ./mmfeat-data demo

test: $(STAMP)
	.venv/bin/python -m pytest -q

lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

clean:
	rm -rf mmfeat-data mmfeat-data-source mmfeat-data-exports mmfeat-data-report.html mmfeat-data-prefect .prefect .pytest_cache
