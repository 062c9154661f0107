"""tests/mutations/ holds a script run by hand (``run.py``, see its docstring), never tests:
pytest collects nothing here."""

collect_ignore_glob = ["*"]
