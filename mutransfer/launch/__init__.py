"""Sweeps over proxy shapes, transfer of the best settings to the target, reports, the MLflow UI, the demo."""
