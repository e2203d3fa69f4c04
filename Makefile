# The two commands: `make demo` and `make test`. Both create .venv on first use.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

demo: .venv/.installed
	$(PY) train.py config/tiny.py --out_dir=out/demo

test: .venv/.installed
	$(PY) -m pytest -q -m "not slow"

.PHONY: demo test
