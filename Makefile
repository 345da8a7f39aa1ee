# The two entry points a fresh machine needs: `make demo` (the main job) and `make test`.
# Each installs what it needs first: Debian's man pages (the real corpora) and a virtual
# environment with the CPU build of PyTorch 2.13.0 installed before anything can pull a CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=

.PHONY: demo demo-quick test install manpages clean

demo: install manpages
	$(PY) -m demo $(DEMO_ARGS)

demo-quick: install manpages
	$(PY) -m demo --quick $(DEMO_ARGS)

test: install manpages
	$(PY) -m pytest -q

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# English and German man pages: the old and the new corpus of the demo (a strong shift, as in the paper).
# Checked by package, not by folder: base packages (apt, dpkg, man-db...) put a few German pages into
# /usr/share/man/de on their own, which once made the demo run on a tenth of its German corpus.
MANPAGE_PACKAGES := man-db manpages manpages-dev manpages-de manpages-de-dev

manpages:
	@dpkg -s $(MANPAGE_PACKAGES) >/dev/null 2>&1 || { \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(MANPAGE_PACKAGES); }

clean:
	rm -rf $(VENV) runs
