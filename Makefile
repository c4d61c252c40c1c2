# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean venv

venv: $(STAMP)

# torch and torchvision are pinned here, not in pyproject, so that pip takes the
# builds that lie on this machine's disk; pyproject allows a range that includes them.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev,hf]'
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/fxgrow compare --model tiny_vit --model-kwargs '{"embed_dim": 64, "depth": 4, "num_heads": 4}' --img-size 16 --epochs 20 --lr 2e-3 --warmup 5 --interval 4 --end-epoch 17 --param-target 175000 --layer-threshold 4 --run-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
