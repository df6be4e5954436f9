# Two commands for a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tapeout-installed
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-rtl bench clean-cache venv

venv: $(STAMP)

# torch==2.13.0 first: a CPU build of exactly that version is on disk; any other resolution
# would download GBs of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,models]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p .cache
	$(PY) models/tiny.py --family llama --exporter dynamo --opset 20 --variant prefill > .cache/demo-model.txt
	$(VENV)/bin/tapeout inspect $$(cat .cache/demo-model.txt)
	$(VENV)/bin/tapeout compile $$(cat .cache/demo-model.txt) --target maskrom --format nvfp4 --gds-tiles all -o out/demo
	$(VENV)/bin/tapeout estimate --hf-config backends/maskrom/configs/smollm2-135m.json --format nvfp4
	$(PY) -c "import numpy; numpy.save('.cache/demo-prompt.npy', numpy.array([1, 2, 3, 4]))"
	$(VENV)/bin/tapeout run out/demo --tokens .cache/demo-prompt.npy --new-tokens 8
	@echo "results: out/demo/ (report.json, chip/sequencer.txt, layers/, layout/tiles.gds, layout/die.png, manifest.json)"

# two xdist workers on two cores: one BLAS thread each (spinning BLAS threads oversubscribe)
test: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

test-rtl: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m rtl $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/import_speed.py

clean-cache:
	rm -rf .cache
