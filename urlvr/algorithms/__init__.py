"""The RL algorithm as pure tensor functions: advantage estimators, policy losses, KL
estimators, loss aggregation, importance weights and per-token statistics.

Trainer, metrics and rewards import from here; nothing here imports them.
"""
