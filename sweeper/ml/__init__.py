"""The machine learning: data as device tensors, models, the training loop, metrics, model files.

Nothing here imports optuna or mlflow: a sweep drives the trainer through plain calls.
"""
