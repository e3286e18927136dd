# Two commands for a new machine:  `make demo` (the main job on the embedded default) and `make test`.
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test bench gpu-check lock clean
setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "error: micro-budget needs Python >= 3.11; $(PY) is $$($(PY) --version 2>&1 || echo missing). Install 3.11+ and run: make $(MAKECMDGOALS) PY=python3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --no-deps -r requirements.lock
	$(BIN)/pip uninstall -y dataclasses 2>/dev/null || true
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

demo: setup          ## the main job: the whole pipeline on the embedded default (CPU, offline, minutes)
	$(BIN)/python -m flows.demo

test: setup          ## every test but those that need a GPU
	$(BIN)/python -m pytest -m "not gpu" -q

bench: setup
	$(BIN)/python -m microdit.bench

gpu-check: setup     ## on one H100/H200 (<= 8 min): paper stages' steps, memory vs planner, MFU, checkpoint, VAE
	$(BIN)/python -m microdit.gpu_check --out runs/gpu_check.json

lock:                ## refresh requirements.lock from the current environment
	$(BIN)/pip freeze --exclude-editable | grep -v '^dataclasses==' > requirements.lock.new && mv requirements.lock.new requirements.lock

clean:
	rm -rf runs/ .pytest_cache
