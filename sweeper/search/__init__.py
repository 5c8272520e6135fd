"""Optuna: storages, samplers, queries over one study, and the ask → fit → tell loop."""
