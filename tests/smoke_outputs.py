"""Checks shared by the experiments' smoke tests."""

import csv


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_outputs(out):
    """The run wrote a non-empty md, png and csv, and the md says it is a smoke run."""
    for suffix in (".md", ".png", ".csv"):
        assert out.with_suffix(suffix).stat().st_size > 0, suffix
    assert "SMOKE RUN" in out.with_suffix(".md").read_text()
