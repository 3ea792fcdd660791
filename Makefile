# Two commands on a fresh machine:  make serve  (the app on the sample data)  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000
# the bundled sample make serve serves: auto = openkbp once sample-data/openkbp/models holds models, else totalsegmentator
SAMPLE ?= auto

.PHONY: serve test system-deps

$(STAMP): requirements.txt constraints.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -r requirements.txt pytest ruff
	$(VENV)/bin/pip install -q --no-deps -e .
	$(PY) -m labelfactory.evaluation.fid_weights --quiet || true
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m labelfactory.cli serve --port $(PORT) --sample $(SAMPLE)

# Orthanc + DICOMweb for the DICOMweb test (best effort: the test skips, saying why, without it)
system-deps:
	@command -v Orthanc >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null) || echo "Orthanc not installed: the DICOMweb test will be skipped"; }

test: $(STAMP) system-deps
	$(PY) -m pytest -q
