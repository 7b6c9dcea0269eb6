# avgate — two set-up commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Debian packages the test suite drives for real (installed when root with apt-get).
TEST_DEBS ?= clamav-daemon clamdscan clamav-milter swaks postfix squid c-icap libc-icap-mod-virus-scan

.PHONY: run test test-deps venv bench fuzz lint typecheck clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(VENV)/.installed
$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install -q -e '.[test,dev]'
	touch $@

run: venv
	$(VENV)/bin/avgate serve $(if $(CONFIG),--config $(CONFIG))

test-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else echo "not root or no apt-get: tests needing real daemons will skip with a reason"; fi

test: venv test-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(PY) bench/run.py

fuzz: venv
	AVGATE_FUZZ_EXAMPLES=20000 $(PY) -m pytest -q tests/fuzz tests/unit/content/test_fuzz.py tests/unit/content/test_mimeparse.py

lint: venv
	$(VENV)/bin/ruff check src tests bench

typecheck: venv
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
