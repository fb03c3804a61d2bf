"""Evaluation: base vs adapter item by item (`evaluate`), preference accuracy, the HTML report."""
