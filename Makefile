# Two commands for a new machine:  `make demo` (the main job on the embedded default) and `make test`.
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
# torch for the machine at hand: "cuda" (the lock's CUDA build and its nvidia-* libraries) where a driver
# answers nvidia-smi, else "cpu" (the same torch version from PyTorch's CPU wheel index, about 4 GB less;
# when that index cannot be reached the lock's CUDA build is installed instead: it runs on CPUs too).
TORCH ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
CUDA_ONLY := ^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==
LOCKED = $(shell sed -n 's/^$(1)==//p' requirements.lock)

export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test bench gpu-check lock clean rehearsal
setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "error: micro-budget needs Python >= 3.11; $(PY) is $$($(PY) --version 2>&1 || echo missing). Install 3.11+ and run: make $(MAKECMDGOALS) PY=python3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
ifeq ($(TORCH),cuda)
	$(BIN)/pip install --no-deps -r requirements.lock
else
	grep -Ev '$(CUDA_ONLY)' requirements.lock > $(VENV)/requirements-cpu.txt
	grep -E '$(CUDA_ONLY)' requirements.lock > $(VENV)/requirements-cuda-torch.txt
	$(BIN)/pip install --no-deps -r $(VENV)/requirements-cpu.txt
	$(BIN)/pip install --no-deps --timeout 15 --retries 1 --index-url $(TORCH_CPU_INDEX) \
	    torch==$(call LOCKED,torch)+cpu torchvision==$(call LOCKED,torchvision)+cpu \
	  || { echo "note: no CPU build of torch from $(TORCH_CPU_INDEX) (unreachable, or pip refused it):" \
	            "installing the lock's CUDA build instead (runs on CPUs, about 4 GB more). TORCH=cuda skips the try." >&2; \
	       $(BIN)/pip install --no-deps -r $(VENV)/requirements-cuda-torch.txt; }
endif
	$(BIN)/pip uninstall -y dataclasses 2>/dev/null || true
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

demo: setup          ## the main job: the whole pipeline on the embedded default (CPU, offline, minutes)
	$(BIN)/python -m flows.demo

test: setup          ## every test but those that need a GPU
	$(BIN)/python -m pytest -m "not gpu" -q

rehearsal: setup     ## the paper profile's code path at toy size: S3 + 2-node Ray + torchrun x2 + resume (CPU, minutes)
	OMP_NUM_THREADS=1 $(BIN)/python -m flows.rehearsal

bench: setup
	$(BIN)/python -m microdit.bench

gpu-check: setup     ## on one H100/H200 (<= 8 min): paper stages' steps, memory vs planner, MFU, checkpoint, VAE
	$(BIN)/python -m microdit.gpu_check --out runs/gpu_check.json

lock:                ## refresh requirements.lock from the current environment
	$(BIN)/pip freeze --exclude-editable | grep -v '^dataclasses==' > requirements.lock.new && mv requirements.lock.new requirements.lock

clean:
	rm -rf runs/ .pytest_cache
