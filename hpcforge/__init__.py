"""The top of the import tree: the `hpcforge` command (cli.py), which may import every layer below.

Imports point one way, hpcforge -> jobs -> pipeline -> models (issue #17; tests/test_layering.py
keeps it so): `pipeline/` never imports `jobs`, `benchmarks` or `hpcforge`, and `models/` imports
none of them.
"""
