# lorafuse developer commands. `make install && make test` is the whole set-up on a fresh machine.
PYTHON ?= python3
# The CPU build on PyPI's mirror here; on a GPU machine install a CUDA torch first and this is skipped.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-gpu bench lint

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
