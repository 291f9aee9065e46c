# bbt-onnx: `make install`, then `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODELS  ?= models

.PHONY: install test test-slow demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[export,test]"

test:
	$(BIN)/python -m pytest -q

test-slow:
	$(BIN)/python -m pytest -q --runslow

# export -> tune -> evaluate on a tiny random RoBERTa (CPU, seconds, no hub)
demo:
	$(BIN)/python -m bbt_onnx_export.tiny $(MODELS)/tiny-src
	$(BIN)/bbt-onnx export --model $(MODELS)/tiny-src --out $(MODELS)/tiny --prompt-tokens 8 --int8 --force
	$(BIN)/python -m bbt_onnx.synthetic $(MODELS)/demo-data
	$(BIN)/bbt-onnx tune --model $(MODELS)/tiny --task sst2 --data $(MODELS)/demo-data/pool.csv \
		--test $(MODELS)/demo-data/test.csv --prompt-tokens 8 --intrinsic-dim 50 --budget 800 \
		--out runs/demo --force
	$(BIN)/bbt-onnx evaluate --model $(MODELS)/tiny --prompt runs/demo --data $(MODELS)/demo-data/test.csv

clean:
	rm -rf runs $(MODELS)/tiny $(MODELS)/tiny-src $(MODELS)/demo-data .pytest_cache
