"""Verification: metrics, the Geo-Score, the evaluation runner, its results and report."""
