"""The built-in tasks: `digits` (MLP on sklearn's digits), `charlm` (a small character-level
GPT on CPython's pydoc topics) and `synthetic` (weights of any size for benchmarks).

All three run with no download: their data ships with scikit-learn, with CPython, or is
made up.
"""
