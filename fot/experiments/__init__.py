"""Experiment runners: `python -m fot.experiments.passkey_retrieval CONFIG` (FoT vs RoPE-scaling baselines on
passkey retrieval) and `python -m fot.experiments.sweep CONFIG` (ablation grids). Configs live in
configs/experiments/, results in experiments/results/<name>/."""
