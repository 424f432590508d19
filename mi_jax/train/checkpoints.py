"""Kept only for train/pretrain.py and train/distill.py, which still import these names from
here: the reader is mi_jax/convert/checkpoint.py (remove this file when they import it)."""

from mi_jax.convert.checkpoint import latest_checkpoint, load_run_config, load_run_params, load_run_tree

__all__ = ["latest_checkpoint", "load_run_config", "load_run_params", "load_run_tree"]
