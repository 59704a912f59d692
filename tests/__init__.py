"""The test suite (a package, so test files share the toy verifiers and backends of ``tests/helpers.py``)."""
