# The two commands: `make demo` and `make test`. Both create .venv on first use.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

# The shapes world's reference images are rendered from its grammar, not committed (~1 s).
REFS := assets/tinyworld/refs_light/index.json
$(REFS): | .venv/.installed
	$(PY) tinyworld.py

# The shapes-world demo: Adv-GRPO and the same discriminator frozen after its warm-up (a fixed learned
# reward), from the same flawed base, side by side on two cores (the frozen run logs to its folder), then
# one before → after table of both.
demo: .venv/.installed $(REFS)
	mkdir -p out/demo
	OMP_NUM_THREADS=1 $(PY) train.py config/tiny_frozen.py --out_dir=out/demo/frozen --overwrite=True \
		> out/demo/frozen.log 2>&1 & \
	OMP_NUM_THREADS=1 $(PY) train.py config/tiny.py --out_dir=out/demo/adversarial --overwrite=True; \
	adversarial=$$?; wait $$!; frozen=$$?; \
	[ $$adversarial -eq 0 ] || echo "the Adv-GRPO run failed (exit $$adversarial): see its output above"; \
	[ $$frozen -eq 0 ] || echo "the fixed-reward run failed (exit $$frozen): see out/demo/frozen.log"; \
	[ $$adversarial -eq 0 ] && [ $$frozen -eq 0 ]
	$(PY) sample.py --compare out/demo/adversarial out/demo/frozen

# Two pytest workers (pytest-xdist), one thread each: the two cores of a laptop or CI machine both busy.
test: .venv/.installed $(REFS)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not slow and not scale"

.PHONY: demo test
