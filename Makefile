# The two commands: `make run` (install what is missing, start the stack) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: run test test-container bench install system-deps lint clean

run: install
	$(VENV)/bin/bastion up

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

# The image built and run with a real engine (podman + runc, base image from debootstrap; root only), see
# tests/test_container.py. Images are cached in /var/tmp/bastion-container-test (BASTION_CONTAINER_CACHE).
test-container: install
	@for tool in podman runc debootstrap; do command -v $$tool >/dev/null || [ -x /usr/sbin/$$tool ] || \
		{ $(MAKE) system-deps PACKAGES="podman runc debootstrap" && break; }; done
	BASTION_CONTAINER_TEST=1 $(VENV)/bin/pytest -q -s -p no:cacheprovider tests/test_container.py

bench: install
	@command -v wrk >/dev/null || $(MAKE) system-deps PACKAGES=wrk
	$(PY) bench/gate_micro.py
	$(PY) bench/bench.py
	$(PY) bench/keys.py
	$(PY) bench/usage_ingest.py
	$(PY) bench/usage_summary.py
	$(PY) bench/streams.py
	$(PY) bench/stream_memory.py
	$(PY) bench/balance.py

install: $(STAMP)

$(STAMP):
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || $(MAKE) system-deps
	@# token metering (njs): installed when missing if we can, else said (Bastion runs without it)
	@[ -e /usr/lib/nginx/modules/ngx_http_js_module.so ] || { [ "$$(id -u)" = 0 ] && $(MAKE) system-deps \
		PACKAGES=libnginx-mod-http-js; } || echo "note: apt-get install libnginx-mod-http-js for token metering" >&2
	test -d $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

# nginx from the distribution; only possible as root (otherwise: say what to install).
PACKAGES ?= nginx libnginx-mod-http-js
system-deps:
	@if [ "$$(id -u)" != 0 ]; then echo "please install: apt-get install $(PACKAGES)" >&2; exit 1; fi
	./.ci/apt-install $(PACKAGES)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
