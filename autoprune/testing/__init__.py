"""What tests use — ours and those of methods written outside this repository (as `optuna.testing` is Optuna's).

- `models`: the tiny real timm models (`TINY_VIT`, `TINY_RESNET`, `TINY_BOTTLENECK`, the `FAMILIES` every method
  is held to), the reference data (`reference_bundle`, `example_inputs`) and `briefly_trained` dense models.
- `contracts`: the pruning and healing contracts as plain functions (`check_prune_method`,
  `check_prune_method_in_trial`, `check_heal_method`, `check_heal_method_in_trial`) that a test parametrises over
  its methods; its docstring shows a third-party method's test.
- `loopback`: real servers bound to 127.0.0.1 — a multi-node Ray cluster, an MLflow tracking server, an S3 store.

None of it needs pytest; nothing else in `autoprune` imports it.
"""
