"""Train state, trainable subsets, optimiser and EMA: shared by pretraining and distillation."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util

TRAIN, FREEZE = "train", "freeze"


@struct.dataclass
class TrainState:
    """Everything a step changes. `params` holds frozen and trainable leaves alike (the
    optimiser keeps no state for frozen ones); `ema` has the structure of `params` with None at
    the frozen leaves (an EMA of frozen weights would only cost memory)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any
    nan_count: jax.Array  # updates skipped because the loss or the gradients were not finite
    nan_streak: jax.Array  # ... in a row, up to now


def trainable_labels(params: Mapping, patterns: Sequence[str]) -> Any:
    """`"train"` for leaves whose '/'-joined path matches any regex in `patterns`, else
    `"freeze"`. Raises when nothing matches (a typo would silently train nothing)."""
    compiled = [re.compile(p) for p in patterns]
    labels = traverse_util.path_aware_map(
        lambda path, _: TRAIN if any(c.search("/".join(path)) for c in compiled) else FREEZE, params
    )
    if TRAIN not in jax.tree.leaves(labels):
        raise ValueError(f"no parameter matches the trainable patterns {list(patterns)}")
    return labels


def make_optimizer(cfg, labels) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay and global-norm clipping on the trainable leaves;
    frozen leaves get no update and no optimiser state (`optax.multi_transform`)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=max(1, cfg.warmup_steps),
        decay_steps=max(cfg.warmup_steps + 1, cfg.steps),
        end_value=cfg.learning_rate * cfg.final_lr_fraction,
    )
    train = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, weight_decay=cfg.weight_decay),
    )
    return optax.multi_transform({TRAIN: train, FREEZE: optax.set_to_zero()}, labels)


def freeze(params, labels):
    """Stops gradients at frozen leaves, so XLA never computes their weight gradients."""
    return jax.tree.map(lambda p, lab: p if lab == TRAIN else jax.lax.stop_gradient(p), params, labels)


def ema_init(params, labels):
    return jax.tree.map(lambda p, lab: p if lab == TRAIN else None, params, labels)


def ema_update(ema, params, decay: float):
    def one(e, p):
        return None if e is None else (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype)

    return jax.tree.map(one, ema, params, is_leaf=lambda x: x is None)


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(abstract_state, param_shardings, replicated):
    """Shardings for every leaf of a train state: a leaf whose path ends with a parameter's
    path and has its shape (params, EMA, Adam moments, ...) is placed like that parameter;
    anything else (counters, scalars) is replicated."""
    by_path = {_keys(p): v for p, v in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    out = []
    for path, leaf in leaves:
        keys = _keys(path)
        sharding = replicated
        for start in range(len(keys)):
            cand = by_path.get(keys[start:])
            if cand is not None and len(cand.spec) <= len(leaf.shape):
                sharding = cand
                break
        out.append(sharding)
    return jax.tree_util.tree_unflatten(treedef, out)


def init_state(params, tx: optax.GradientTransformation, labels, *, ema: bool = True) -> TrainState:
    """The step-0 state; `ema=False` keeps no EMA (None), e.g. a DMD2 critic. The EMA starts as
    a copy: the loop donates the state, and one buffer must not appear twice in it."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, ema_init(params, labels)) if ema else None,
                      nan_count=zero, nan_streak=zero)


def global_norm(grads) -> jax.Array:
    """The gradients' global L2 norm, accumulated in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))


def count_nonfinite(nan_count, nan_streak, finite) -> tuple[jax.Array, jax.Array]:
    """The NaN guard's counters after one step: skipped steps in all, and in a row."""
    return nan_count + (~finite).astype(jnp.int32), jnp.where(finite, 0, nan_streak + 1)


def apply_if_finite(state: TrainState, grads, finite, tx, ema_decay: float) -> TrainState:
    """One optimiser update, or none at all when `finite` is False (counted)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema, params, ema_decay)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    nan_count, nan_streak = count_nonfinite(state.nan_count, state.nan_streak, finite)
    return TrainState(step=state.step + 1, params=keep(params, state.params),
                      opt_state=keep(opt_state, state.opt_state), ema=keep(ema, state.ema),
                      nan_count=nan_count, nan_streak=nan_streak)


def guarded_update(state: TrainState, grads, loss, tx, ema_decay: float) -> tuple[TrainState, jax.Array, jax.Array]:
    """`apply_if_finite` when the loss and the gradients' norm are finite, else a skipped,
    counted step. Returns `(state, finite, grad_norm)`."""
    norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(norm)
    return apply_if_finite(state, grads, finite, tx, ema_decay), finite, norm
