# Two commands on a fresh machine:  make serve  (the app on the sample data)  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000
# pytest-xdist workers for make test (one per core of a 2-core CI machine; each worker runs one torch thread)
TEST_WORKERS ?= 2
MAKE_START := $(shell date +%s)
# the bundled sample make serve serves: auto = openkbp once sample-data/openkbp/models holds models, else totalsegmentator
SAMPLE ?= auto

SYSTEM_STAMP := $(VENV)/.system-deps

.PHONY: serve test

$(STAMP): requirements.txt constraints.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -r requirements.txt pytest pytest-xdist ruff
	$(VENV)/bin/pip install -q --no-deps -e .
	$(PY) -m labelfactory.evaluation.fid_weights --quiet || true
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m labelfactory.cli serve --port $(PORT) --sample $(SAMPLE)

# Orthanc + DICOMweb for the DICOMweb test (best effort, tried once per venv: the test skips, saying why, without it)
$(SYSTEM_STAMP): $(STAMP)
	@command -v Orthanc >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null) || echo "Orthanc not installed: the DICOMweb test will be skipped"; }
	@touch $@

test: $(SYSTEM_STAMP)
	@start=$$(date +%s); $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30; rc=$$?; end=$$(date +%s); \
	echo "make test: pytest $$((end - start)) s, $$((end - $(MAKE_START))) s in all (set-up included)"; exit $$rc
