"""The study file: its schema and defaults, YAML loading, the `space:` block, shape planning.

Nothing here imports torch, optuna or mlflow (`sweeper validate` stays instant).
"""
