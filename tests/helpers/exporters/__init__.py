"""Builders of the layouts real exporters write (issue 14's patterns), one module per exporter, shared by
tests/test_exporters_*.py and tools/exporter_fixtures.py (which writes them out for bench/samples.py).

A module's RNG is the one its test file draws from as well: each model depends on the draws made before it.
"""
