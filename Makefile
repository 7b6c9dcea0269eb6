# avgate — two set-up commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Debian packages the test suite drives for real (installed when root with apt-get): every
# binary, Perl module and plug-in in tests/helpers.py REQUIREMENTS (a unit test keeps the two
# equal; tests/conftest.py stops a run at its start, with one line, when one is missing).
# swaks needs libnet-ssleay-perl and libio-socket-ssl-perl for STARTTLS, and
# --no-install-recommends leaves them out; openssl makes the test certificates; mount gives
# the reliability tests a small tmpfs. swaks' other recommends (libnet-dns-perl,
# libio-socket-inet6-perl, libsocket6-perl) are not needed: every test passes
# --server 127.0.0.1:PORT (the SMTP tests pass with those modules made unloadable).
TEST_DEBS ?= clamav-daemon clamdscan clamav-milter swaks libnet-ssleay-perl libio-socket-ssl-perl \
             postfix squid c-icap libc-icap-mod-virus-scan openssl mount postgresql redis-server \
             libarchive13 nginx curl wget qpdf dovecot-core dovecot-pop3d \
             dovecot-imapd chromium chromium-driver clamav-testfiles

# Debian packages running needs (installed by `make run` when root with apt-get): libarchive
# reads RAR, CAB, ISO 9660, cpio and LHA (without it those formats are `unknown`, never clean);
# libpq is the PostgreSQL client library of the shared quarantine (psycopg).
RUN_DEBS ?= libarchive13 libpq5

.PHONY: run run-deps test test-deps venv venv-dev bench fuzz lint typecheck clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# `make run` installs what running needs; `make test` adds the test and lint extras.
venv: $(VENV)/.installed
$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install -q -e '.'
	touch $@

venv-dev: $(VENV)/.installed-dev
$(VENV)/.installed-dev: $(PY) pyproject.toml
	$(PIP) install -q -e '.[test,dev]'
	touch $@ $(VENV)/.installed

run: venv run-deps
	$(VENV)/bin/avgate serve $(if $(CONFIG),--config $(CONFIG))

# never fatal: without them avgate still runs (RAR/CAB/ISO... are `unknown`, no PostgreSQL)
run-deps:
	@$(MAKE) --no-print-directory test-deps TEST_DEBS="$(RUN_DEBS)" || \
	  echo "WARNING: could not install $(RUN_DEBS); RAR, CAB, ISO 9660, cpio and LHA will be" \
	       "'unknown' and the PostgreSQL quarantine unavailable until they are installed"

test-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(TEST_DEBS); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q ' installed$$' || missing="$$missing $$p"; \
	  done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    install="env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends"; \
	    $$install $$missing >/dev/null 2>&1 || { apt-get update -qq && $$install $$missing >/dev/null; }; \
	  fi; \
	else echo "not root or no apt-get: tests needing real daemons will skip with a reason" \
	  "(with CI set, the run stops at its start naming what is missing)"; fi

test: venv-dev test-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv-dev
	$(PY) bench/run.py $(BENCH_ARGS)

fuzz: venv-dev
	AVGATE_FUZZ_EXAMPLES=20000 $(PY) -m pytest -q tests/fuzz tests/unit/content/test_fuzz.py tests/unit/content/test_mimeparse.py

lint: venv-dev
	$(VENV)/bin/ruff check src tests bench

typecheck: venv-dev
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
