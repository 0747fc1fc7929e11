# The learning-quality report, outside the test suite (a few minutes on a laptop CPU):
#     make -f quality.mk quality
# writes report/quality.md (the table) and report/quality.png (the curves).
PYTHON ?= .venv/bin/python

.PHONY: quality
quality:
	$(PYTHON) bench/quality.py --out report
