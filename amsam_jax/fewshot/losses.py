"""The segmentation loss of both levels (docs/fewshot.md §4.3): (1 - λ) CE + λ soft Dice."""

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over all B*H*W pixels of -log softmax(z)[y]; logits (B, n, H, W), labels (B, H, W)."""
    logp = jax.nn.log_softmax(logits, axis=1)
    picked = jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1)
    return -jnp.mean(picked)


def soft_dice_loss(logits: jax.Array, labels: jax.Array, smooth: float = 1e-5) -> jax.Array:
    """Mean over classes (background included) of 1 - (2I + s) / (Z + V + s), batch-pooled sums."""
    n = logits.shape[1]
    probs = jax.nn.softmax(logits, axis=1)
    onehot = jax.nn.one_hot(labels, n, axis=1, dtype=probs.dtype)
    axes = (0, 2, 3)
    inter = jnp.sum(probs * onehot, axis=axes)
    z = jnp.sum(probs * probs, axis=axes)
    v = jnp.sum(onehot * onehot, axis=axes)
    return jnp.mean(1.0 - (2.0 * inter + smooth) / (z + v + smooth))


def segmentation_loss(logits: jax.Array, labels: jax.Array, dice_weight: float = 0.8) -> jax.Array:
    """(1 - λ) * CE + λ * Dice of logits (B, n, H, W) against integer labels (B, H, W)."""
    return (1.0 - dice_weight) * cross_entropy(logits, labels) + dice_weight * soft_dice_loss(
        logits, labels
    )
