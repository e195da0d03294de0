"""``llmchat finetune``: P-tuning v2 training with THUDM ``ptuning/main.py``'s command line.

Modules: ``args`` (the flags), ``data`` (files and upstream's preprocessing), ``train`` (the
differentiable prefix forward, HF-Trainer optimisation, checkpoints), ``metrics``
(``compute_metrics``; optional ``finetune`` extra), ``run`` (the command).
"""
