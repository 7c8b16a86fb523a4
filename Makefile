# cdcca_ros — the commands a user needs. Each one sets up what it needs first (tools/setup.sh):
# the virtual environment in .venv, the pinned wheels, and the colcon build in .colcon.
SHELL := /bin/bash
RUN := tools/run.sh
PYTEST_ARGS ?=
ARGS ?=
CMD ?= python -c 'import cdcca_ros.msg; print("environment ready")'

.PHONY: help setup test demo run models bench lint clean

help:
	@echo 'make test             set up (first time: a few minutes) and run the test suite'
	@echo 'make demo [ARGS=...]  run the whole device-cloud loop on the embedded default'
	@echo "make run CMD='...'    run any command inside the environment (package built and sourced)"
	@echo 'make models           retrain the bundled teacher/student (seeded)'
	@echo 'make bench            write bench/results/*.json and the benchmark report'
	@echo 'make lint             ruff over the sources'
	@echo 'make clean            remove the build (keeps .venv); make distclean removes .venv too'

setup:
	@tools/setup.sh

test:
	@$(RUN) 'python tools/run_tests.py test $(PYTEST_ARGS)'

demo:
	@$(RUN) 'python -m cdcca_ros.demo $(ARGS)'

run:
	@$(RUN) "$$CMD"

models:
	@$(RUN) 'python -m cdcca_ros.sim.train_bundled $(ARGS)'
	@$(RUN) 'python -m cdcca_ros.sim.train_captions $(ARGS)'
	@$(RUN) 'python -m cdcca_ros.core.uplink.fit --model bundled:student'

bench:
	@$(RUN) 'python -m cdcca_ros.bench report $(ARGS)'

lint:
	@$(RUN) 'ruff check cdcca_ros test tools'

clean:
	rm -rf .colcon

distclean: clean
	rm -rf .venv
