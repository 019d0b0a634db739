# The two commands the README gives: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
PORT ?= 8000
DATA ?= data/synthetic

.PHONY: setup demo data train evaluate export serve test test-slow reliability audit lint format clean

$(BIN)/pod: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned to the release on this machine's disk; a plain `torch` would download a CUDA build
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.3,<2.15"
	$(BIN)/pip install -q -e ".[all]"
	touch $(BIN)/pod

setup: $(BIN)/pod

# `make demo` runs the stages below in order, each only when its output is missing or older than its input, so
# a rerun (after a Ctrl-C, or to serve again) reuses what exists: data -> train -> evaluate, export -> serve.
# Delete a stage's output (or `make clean`) to redo it.
demo: data train evaluate export
	@$(MAKE) --no-print-directory serve

data: $(DATA)/manifest.json
$(DATA)/manifest.json: | $(BIN)/pod
	$(BIN)/pod data synth --out $(DATA)

# Training leaves $(RUN)/.trained when it ends; a run stopped before that (Ctrl-C) resumes from $(RUN)/last.
# The recipe (one token per item, every prefix a sample, top-N with the history, best epoch by validation HR@10)
# is `pod train`'s default; the paper's form is `--item-ids digits --sequential-samples one --select-by loss`.
train: $(RUN)/.trained
$(RUN)/.trained: $(DATA)/manifest.json | $(BIN)/pod
	$(BIN)/pod train --data $(DATA) --out $(RUN) --preset tiny --epochs 30 --max-minutes 5 --batch-size 64 --lr 1e-3 \
		$(if $(wildcard $(RUN)/last/training_state.json),--resume,)
	touch $@

evaluate: $(RUN)/eval.json
$(RUN)/eval.json: $(RUN)/.trained $(DATA)/manifest.json | $(BIN)/pod
	$(BIN)/pod evaluate --checkpoint $(RUN) --data $(DATA) --out $(RUN)/eval.json

export: $(RUN)/bundle/bundle.json
$(RUN)/bundle/bundle.json: $(RUN)/.trained | $(BIN)/pod
	$(BIN)/pod export --checkpoint $(RUN) --out $(RUN)/bundle

# Serves the bundle that is there (`make export`, or `make demo`, writes one); it never trains.
serve: | $(BIN)/pod
	@test -f $(RUN)/bundle/bundle.json || { echo "no bundle in $(RUN)/bundle: run 'make demo' (or 'make export') first" >&2; exit 1; }
	@echo ""
	@echo "Serving $(RUN)/bundle on http://127.0.0.1:$(PORT) (Ctrl-C stops it). Try, from another shell:"
	@echo "  curl -s -X POST localhost:$(PORT)/recommend/sequential -H 'content-type: application/json' -d '{\"user_id\": 5, \"k\": 5}'"
	@echo "  curl -s -X POST localhost:$(PORT)/recommend/topn -H 'content-type: application/json' -d '{\"user_id\": \"U00005\", \"candidates\": [\"P00001\", \"P00002\", \"P00003\"], \"k\": 2}'"
	@echo "  curl -s -X POST localhost:$(PORT)/explain -H 'content-type: application/json' -d '{\"user_id\": 5, \"item_id\": 3}'"
	@echo "  curl -s localhost:$(PORT)/metrics | grep pod_"
	@echo ""
	$(BIN)/pod serve --bundle $(RUN)/bundle --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The images and the compose stack for real, with podman (issue 17; Debian machines without Docker Hub): installs
# podman and makes a debootstrap Debian base when missing, builds serve, train, loadtest and a Debian Prometheus
# (sizes in runs/images/report.json), then tests them and `docker compose up` (figures in runs/images/stack.json).
# Root needed (apt, rootful podman). `make build-images` only builds; serve-gpu needs a CUDA base from Docker Hub.
.PHONY: build-images test-images
build-images:
	sh deploy/images/podman-setup.sh
	sh deploy/images/build.sh

test-images: setup build-images
	$(BIN)/python -m pytest -q -m images tests/test_images.py

# The long reliability checks (fuzzing, 60 s overload, SIGTERM under load, faults); see RELIABILITY.md.
# Uses $(RUN)/bundle when `make demo` wrote one, else builds a small one first.
reliability: setup
	$(BIN)/python -m reliability.run_all --out reliability/results $(if $(wildcard $(RUN)/bundle/bundle.json),--bundle $(RUN)/bundle,)

# Known vulnerabilities in the installed dependencies (needs the vulnerability service reachable).
audit: setup
	$(BIN)/pip install -q pip-audit
	$(BIN)/pip-audit --strict --progress-spinner off  # --strict: a package it could not check fails the audit

# Load test a running server (`make demo` in another shell, or `docker compose up`); reports in $(RUN)/loadtest,
# exit 1 when the SLO is missed. Override e.g. `make loadtest LT_USERS=32 LT_TIME=5m LT_SLO="--max-p99-ms 500"`.
LT_HOST ?= http://127.0.0.1:$(PORT)
LT_USERS ?= 10
LT_TIME ?= 60s
LT_SLO ?= --max-failure-rate 0.01 --max-p99-ms 2000
.PHONY: loadtest
loadtest: setup
	$(BIN)/pod loadtest --host $(LT_HOST) --bundle $(RUN)/bundle --users $(LT_USERS) --run-time $(LT_TIME) \
		--out $(RUN)/loadtest $(LT_SLO)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs data/synthetic
