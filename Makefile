# gentoo-binhost.py: developer tasks. `make test` is the one command CI runs.
PYTHON ?= python3
VENV   ?= .venv
# Test files run in this many processes (pytest-xdist; a file's tests stay together, so module
# fixtures are made once). The tests share only what is safe to share: see tests/conftest.py.
TEST_WORKERS ?= 2
PY      = $(VENV)/bin/python
DEBIAN_PACKAGES = openssh-server gnupg zstd xz-utils wget curl bash gcc openssl distcc debootstrap rsync qemu-user-static
# The arm64 tests' distcc helper cross-compiles (Debian has the package on other architectures only).
DEBIAN_PACKAGES += $(if $(filter aarch64,$(shell uname -m)),,gcc-aarch64-linux-gnu)

.PHONY: test check lint demo bench deps system-deps clean

test: deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests $(PYTEST_ARGS)

check: lint test

# Python 3.9+ syntax, and the script must import with nothing but the standard library.
lint: deps
	$(VENV)/bin/vermin --no-tips --violations -t=3.9- gentoo-binhost.py tests
	$(PY) -I -S -c 'import importlib.util, sys; \
	    spec = importlib.util.spec_from_file_location("gentoo_binhost", "gentoo-binhost.py"); \
	    module = importlib.util.module_from_spec(spec); sys.modules["gentoo_binhost"] = module; \
	    spec.loader.exec_module(module)'

demo: deps
	$(PY) tests/demo.py

bench: deps
	$(PY) tests/bench/run.py
	$(PY) tests/bench/distcc.py
	$(PY) tests/bench/cross.py
	$(PY) tests/bench/pipeline.py
	$(PY) tests/bench/retention.py
	$(PY) tests/bench/trees.py

deps: $(VENV)/.installed system-deps

# Made again when this file changes (a package added here reaches existing checkouts too).
$(VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet pytest pytest-xdist portage==3.0.83 vermin
	touch $@

# Debian packages the integration tests drive; installed only when missing and running as root.
system-deps:
	@missing=; \
	for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        echo ">>> Installing$$missing"; \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null || \
	        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	    else echo " * Not installing$$missing (not root or no apt-get): integration tests may skip"; fi; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache tests/__pycache__
