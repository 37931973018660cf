"""The library's wheel, installed in fresh venvs (Python 3.10-3.13, dependency floor and ceiling,
etcd 3.4 and 3.5): run by scripts/lib_matrix.py from a staging dir, never from the repo (files are
``check_*.py``, so the suite's own run does not collect them)."""
