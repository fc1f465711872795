# lorafuse developer commands. `make install && make test` is the whole set-up on a fresh machine.
PYTHON ?= python3
# The CPU build on PyPI's mirror here; on a GPU machine install a CUDA torch first and this is skipped.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-gpu bench lint check-gpu-compile check-triton-versions

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[test,bench]"

# On a machine without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets it).
test:
	$(PYTHON) -m pytest -q tests

# The same suite natively on a GPU, plus bf16 and LLM-sized shapes; fails when no GPU is present.
test-gpu:
	LORAFUSE_REQUIRE_GPU=1 $(PYTHON) -m pytest -q tests

bench:
	$(PYTHON) -m pytest -q bench --benchmark-only

lint:
	$(PYTHON) -m ruff check lorafuse kernels tests bench examples

# Every kernel variant (dtype, rank, dropout, bias, gradients) compiled for sm_80, sm_90, sm_100 and gfx942 with
# Triton's own compiler, no GPU needed (docs/gpu_compile.md); `make test` runs a representative subset.
check-gpu-compile:
	LORAFUSE_GPU_COMPILE=all $(PYTHON) -m pytest -q tests/test_gpu_compile.py

# The inspection (bf16, r=16, dropout 0.1, llama-7b q_proj) on each arch under older Tritons, each in a throw-away
# venv that sees this machine's torch and lorafuse (--system-site-packages) but has its own triton: setup.py's
# lower bound, torch 2.11's and the newest (TRITON_VERSIONS=3.2.0 shows why the bound is not 3.2; docs/gpu_compile.md).
# Tritons before 3.5 link gfx942 code with ROCm's ld.lld: set TRITON_HIP_LLD_PATH where ROCm is not installed.
TRITON_VERSIONS ?= 3.3.0 3.6.0 3.9.0
TRITON_VENVS ?= /tmp/lorafuse-triton-venvs
check-triton-versions:
	@status=0; for version in $(TRITON_VERSIONS); do \
	  venv=$(TRITON_VENVS)/triton-$$version; rm -rf $$venv; \
	  $(PYTHON) -m venv --system-site-packages $$venv && $$venv/bin/pip install -q "triton==$$version" || exit 1; \
	  for arch in sm_80 sm_90 sm_100 gfx942; do \
	    if TRITON_CACHE_DIR=$$venv/triton-cache $$venv/bin/python -m lorafuse.inspect --arch $$arch \
	        --dtype bf16 --rank 16 --dropout 0.1 > $$venv/$$arch.log 2>&1; \
	    then echo "triton $$version $$arch: ok"; \
	    else status=1; echo "triton $$version $$arch: FAILED ($$venv/$$arch.log):"; tail -n 3 $$venv/$$arch.log; fi; \
	  done; \
	done; exit $$status
