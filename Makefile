# Two commands do everything, from a fresh clone: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch/torchvision pinned only for the install on this kind of machine (a wheel cache on disk);
# pyproject.toml keeps loose ranges, so a user's newer torch works too.
TORCH   ?= torch==2.14.1 torchvision==0.29.1
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test lint install dataset ui benchmark clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST, the embedded dataset: Debian's package when root on Debian, else torchvision's
# download happens at first use (harness/readers.py).
dataset:
	@if [ ! -f $(FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || \
		echo "dataset-fashion-mnist not installable here; falling back to torchvision's download"; \
	fi

demo: install dataset
	$(BIN)/dmlbench demo

test: install dataset
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# one formatter and linter, configured in pyproject.toml ([tool.ruff]); CI fails on either
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

ui: install
	$(BIN)/dmlbench ui

benchmark: install
	$(BIN)/dmlbench benchmark --methods full_finetune,linear_probe,bitfit,adapter,vpt_deep,vptsp_g --backbone vit_small_patch16_224 --baseline

clean:
	rm -rf reports/*/ mlflow.db mlruns optuna
