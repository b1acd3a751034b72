"""Experiment runners: `python -m experiments.passkey_retrieval CONFIG` (FoT vs RoPE-scaling baselines on
passkey retrieval) and `python -m experiments.sweep CONFIG` (ablation grids). Configs live in
configs/experiments/, results in experiments/results/<name>/."""
