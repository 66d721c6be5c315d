# Sandbox Engine — the front door. `make run` and `make test` set up whatever is missing first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SANDBOX_PG_PORT ?= 55432
export SANDBOX_PG_PORT
export SANDBOX_DATABASE_URL ?= postgresql://sandbox:sandbox@127.0.0.1:$(SANDBOX_PG_PORT)/sandbox

.PHONY: help setup packages venv toolchain services base-image images web edge run test test-slow swarm-lab swarm-lab-down bench lint format docs env doctor stop clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

setup: packages venv toolchain services base-image ## install and start everything the engine needs

packages: ## Debian packages: docker.io, postgresql, debootstrap (only when missing)
	@deploy/local/packages.sh

$(STAMP): pyproject.toml
	@python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "python3 must be Python 3.11")'
	@test -x $(BIN)/python || python3 -m venv $(VENV) >&2
	@echo "[venv] installing the package and its dev tools into $(VENV)" >&2
	@# uv resolves and installs from its cache in seconds (pip: over a minute); pip if it fails.
	@# Bytecode is compiled ahead, as pip does: imports then parse no source.
	@$(BIN)/pip install -q --disable-pip-version-check 'uv>=0.5,<1' >&2 \
		&& $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[dev]' >&2 \
		|| $(BIN)/pip install -q --disable-pip-version-check -e '.[dev]' >&2
	@touch $@

venv: $(STAMP) ## the project's Python environment in .venv

toolchain: ## pulumi, its Python language host and traefik, built from Go modules (cached)
	@toolchain/build.sh

services: venv ## start dockerd and the project's PostgreSQL cluster when they are not running; the host firewall
	@deploy/local/dockerd.sh
	@deploy/local/postgres.sh
	@# With the lab swarm up, its nodes may reach the AI gateway's ports (docs/cluster.md).
	@if [ -f .state/swarm-lab/env ]; then set -a; . .state/swarm-lab/env; set +a; fi; \
		$(BIN)/sandbox-engine firewall apply

base-image: ## the offline Debian base image (debootstrap + docker import)
	@images/base/build.sh

images: setup ## build the workspace and service images that changed
	$(BIN)/sandbox-engine images build

web: ## the browser UI (web/dist, served by the API at /), built when its sources changed
	@deploy/local/web.sh

edge: venv toolchain services ## start the local Traefik (API at api.<domain>, sandbox ports)
	@$(BIN)/sandbox-engine edge start

run: setup images edge web ## set up, then run the service (behind the local Traefik) in the foreground (SANDBOX_BACKEND=swarm: on the lab swarm)
	@# The workspaces trust this host's CA bundle (where its TLS is intercepted, package
	@# managers behind the egress proxy then still verify what they fetch).
	@# SANDBOX_BACKEND=swarm: the lab's settings (make swarm-lab first, when it is not up).
	@if [ "$${SANDBOX_BACKEND:-docker}" = swarm ]; then $(MAKE) --no-print-directory swarm-lab; fi
	@# On the lab swarm this host's Traefik also sends sandbox hosts to the swarm's edge.
	@if [ "$${SANDBOX_BACKEND:-docker}" = swarm ]; then set -a; . .state/swarm-lab/env; set +a; \
		$(BIN)/sandbox-engine edge start; fi; \
	SANDBOX_PUBLIC_PORT=$${SANDBOX_PUBLIC_PORT:-8088} \
		SANDBOX_CA_BUNDLE=$${SANDBOX_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt} \
		$(BIN)/sandbox-engine serve

# Four workers on two cores: the tests mostly wait on dockerd and Pulumi (6 min; three: 7.5).
# Five or six are faster (8.3 and 7.3 min against 10 for the suite of this day) but load the
# machine enough that timing-bound tests failed (a terminal resize, a kill -9 mid-create).
TEST_WORKERS ?= 4

test: setup images edge web lint ## set up, build what changed, lint, then run the UI's unit tests and the tests (test-slow included)
	@# The UI's unit tests run beside the first pytest phase; their output follows it.
	@mkdir -p .state; (cd web && npm test --silent) >.state/vitest.log 2>&1 & ui=$$!; \
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"; rc=$$?; \
	wait $$ui; ui_rc=$$?; cat .state/vitest.log; \
	[ $$ui_rc -eq 0 ] || echo "the UI's unit tests failed (web/, npm test)"; \
	[ $$rc -eq 0 ] && [ $$ui_rc -eq 0 ]
	$(MAKE) --no-print-directory test-slow

test-slow: setup images edge ## the tests that need the machine to themselves (attacks, dockerd and PostgreSQL restarts, the lab swarm), one at a time
	$(BIN)/python -m pytest -m "slow and not swarm" -p no:xdist -rP  # -rP: their figures stay in the log
	@# The swarm tests last, on a lab swarm of their own, made here and removed afterwards
	@# (while it is up this host's firewall admits its nodes to the AI gateway's ports).
	@$(MAKE) --no-print-directory swarm-lab
	$(BIN)/python -m pytest -m swarm -p no:xdist -rP; rc=$$?; \
		$(MAKE) --no-print-directory swarm-lab-down; exit $$rc

swarm-lab: setup images ## a 3-node Docker Swarm of dockerds in network namespaces on this machine (SWARM_NODES=N)
	@deploy/swarm/lab.sh up $${SWARM_NODES:-3}

swarm-lab-down: ## remove the lab swarm (nothing of it is left)
	@deploy/swarm/lab.sh down

bench: setup images edge ## benchmarks against raw Docker (QUICK=1 for a short run); results in .bench/
	@$(MAKE) --no-print-directory swarm-lab  # the swarm part's; removed afterwards
	QUICK=$(QUICK) $(BIN)/python -m tests.bench.run; rc=$$?; \
		$(MAKE) --no-print-directory swarm-lab-down; exit $$rc

lint: venv ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

docs: venv ## regenerate docs/templates.md's field table from the template schema
	$(BIN)/python -m engine.model.schema docs/templates.md

env: venv ## print shell exports: eval "$$(make -s env)"
	@$(BIN)/sandbox-engine env

doctor: venv ## a table of every component, OK or the fix; exit 1 when one is missing
	@$(BIN)/sandbox-engine doctor

stop: ## stop the local Traefik and the project's PostgreSQL cluster (dockerd is left running)
	@if [ -x $(BIN)/sandbox-engine ]; then $(BIN)/sandbox-engine edge stop; fi
	@deploy/local/postgres.sh stop

clean: stop ## stop, then remove local state, the venv and the toolchain links (not the caches)
	rm -rf .state $(VENV) .toolchain
