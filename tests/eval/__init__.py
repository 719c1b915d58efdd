"""Tests of evaluation, figures and the offline report. A package, so that its conftest does not
shadow the root `conftest` module that other test files import helpers from."""
