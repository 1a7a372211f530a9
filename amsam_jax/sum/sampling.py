"""SUM's uncertainty-aware prompt sampling (docs/sum.md §5), pure and jit-friendly.

All samplers are vectorised over M masks of one padded frame (M, H, W). Each mask gets its own
key `jax.random.fold_in(key, m)`, so mask m's draw does not depend on M. A weighted draw is a
draw over the candidate set with probability w / sum(w), w = 1 - U (uniform when U is None), and
a `where` returns the backup point b with label 1 when every candidate weight is 0 or the set is
empty. The draw is an inverse-CDF search in two levels (a row by its weight sum, then a column
in that row): the same distribution as the Gumbel-max of docs/sum.md §5.8, from 2 uniforms per mask
instead of H·W Gumbel variates (at 1024² the Gumbel noise dominated a training step). A pixel of
weight 0 is never drawn: its cumulative sum equals its predecessor's exactly. Points are
(x, y) = (column, row) float32 integer pixel indices; labels int32.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from amsam_jax.sum.loss import valid_mask


def _mask_keys(key: jax.Array, num_masks: int) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_masks))


def _weights(
    candidates: jax.Array, uncertainty: jax.Array | None, hard_threshold: float | None
) -> jax.Array:
    """w = (1 - U) on candidates (1 if U is None), 0 elsewhere; optionally 0 where U >= tau."""
    if uncertainty is None:
        w = jnp.ones(candidates.shape, jnp.float32)
    else:
        u = jnp.asarray(uncertainty, jnp.float32)
        w = jnp.clip(1.0 - u, 0.0, 1.0)
        if hard_threshold is not None:
            w = jnp.where(u < hard_threshold, w, 0.0)
    return jnp.where(candidates, w, 0.0)


def _search(cdf: jax.Array, target: jax.Array, last: jax.Array) -> jax.Array:
    """Per row of `cdf` (N, K): the first index with cdf > target, at most `last`."""
    return jnp.minimum(jnp.sum(cdf <= target[:, None], axis=1), last)


def _last_positive(w: jax.Array) -> jax.Array:
    """Per row of w (N, K): the index of the last positive entry (0 if none)."""
    k = w.shape[1]
    return k - 1 - jnp.argmax((w > 0)[:, ::-1], axis=1)


def _weighted_draw(keys: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per mask: a flat pixel index drawn with probability w / sum(w), and whether sum(w) > 0.

    Args:
        keys: (M,) keys, one per mask.
        weights: (M, H, W) non-negative weights.

    Returns:
        (M,) flat indices (row * W + col) and (M,) bool.
    """
    m, h, w = weights.shape
    u = jax.vmap(lambda k: jax.random.uniform(k, (2,), jnp.float32))(keys)  # (M, 2)
    row_sums = jnp.sum(weights, axis=2)  # (M, H)
    row_cdf = jnp.cumsum(row_sums, axis=1)
    total = row_cdf[:, -1]
    row = _search(row_cdf, u[:, 0] * total, _last_positive(row_sums))
    in_row = jnp.take_along_axis(weights, row[:, None, None], axis=1)[:, 0]  # (M, W)
    col_cdf = jnp.cumsum(in_row, axis=1)
    col = _search(col_cdf, u[:, 1] * col_cdf[:, -1], _last_positive(in_row))
    return row * w + col, total > 0


def _index_to_xy(index: jax.Array, width: int, grid_scale: int) -> jax.Array:
    row, col = index // width, index % width
    xy = jnp.stack([col, row], axis=-1).astype(jnp.float32)  # (M, 2) = (x, y)
    # A coarse grid cell c covers input pixels [s c, s c + s - 1]; its centre is s c + (s - 1) / 2.
    return xy * grid_scale + (grid_scale - 1) / 2.0


def sample_first_point(
    key: jax.Array,
    y: Array,
    backup: Float[Array, "m 2"],
    uncertainty: Float[Array, "m h w"] | None = None,
    valid_hw: Int[Array, "m 2"] | None = None,
    hard_threshold: float | None = None,
    grid_scale: int = 1,
) -> tuple[Float[Array, "m 2"], Int[Array, " m"]]:
    """First positive point per mask (docs/sum.md §5.1): p in {y = 1} with probability ∝ 1 - U.

    Args:
        key: PRNG key; mask m uses fold_in(key, m).
        y: (M, H, W) binary targets on the sampling grid.
        backup: (M, 2) fallback points (x, y) in the input frame, used when no candidate has a
            positive weight (empty mask, or U = 1 on all of it).
        uncertainty: (M, H, W) U in [0, 1], or None for uniform sampling (human labels).
        valid_hw: (M, 2) valid sizes (h, w) on the sampling grid, or None for the full grid.
        hard_threshold: if set, pixels with U >= hard_threshold are also excluded (docs/sum.md A7,
            default off); the remaining ones keep the soft weights 1 - U.
        grid_scale: 1 samples on the input frame; 4 samples on a 256 grid of a 1024 frame and
            maps c to 4 c + 1.5 (docs/sum.md §5.7). The backup point is not mapped.

    Returns:
        coords (M, 2) float32 (x, y) and labels (M,) int32 (always 1).
    """
    y = jnp.asarray(y).astype(bool)
    candidates = y & valid_mask(valid_hw, y.shape)
    weights = _weights(candidates, uncertainty, hard_threshold)
    index, found = _weighted_draw(_mask_keys(key, y.shape[0]), weights)
    xy = _index_to_xy(index, y.shape[2], grid_scale)
    coords = jnp.where(found[:, None], xy, jnp.asarray(backup, jnp.float32))
    return coords, jnp.ones(y.shape[0], jnp.int32)


def sample_corrective_point(
    key: jax.Array,
    y: Array,
    pred: Array,
    backup: Float[Array, "m 2"],
    uncertainty: Float[Array, "m h w"] | None = None,
    valid_hw: Int[Array, "m 2"] | None = None,
    hard_threshold: float | None = None,
    grid_scale: int = 1,
) -> tuple[Float[Array, "m 2"], Int[Array, " m"]]:
    """Corrective point per mask (docs/sum.md §5.2): p in {P != y} with probability ∝ 1 - U.

    Args:
        key: PRNG key; mask m uses fold_in(key, m).
        y: (M, H, W) binary targets on the sampling grid.
        pred: (M, H, W) current prediction P = 1[logits > 0] (bool) on the same grid.
        backup: (M, 2) fallback points (x, y) in the input frame (label forced to 1), used when
            there is no error pixel or every error weight is 0.
        uncertainty: (M, H, W) U in [0, 1], or None for uniform sampling.
        valid_hw: (M, 2) valid sizes (h, w) on the sampling grid, or None for the full grid.
        hard_threshold: optional hard cut U < tau (docs/sum.md A7), default off.
        grid_scale: see `sample_first_point`.

    Returns:
        coords (M, 2) float32 (x, y) and labels (M,) int32: y at the drawn pixel (1 = false
        negative, 0 = false positive), 1 on fallback.
    """
    y = jnp.asarray(y).astype(bool)
    errors = (y != jnp.asarray(pred).astype(bool)) & valid_mask(valid_hw, y.shape)
    weights = _weights(errors, uncertainty, hard_threshold)
    index, found = _weighted_draw(_mask_keys(key, y.shape[0]), weights)
    xy = _index_to_xy(index, y.shape[2], grid_scale)
    label = jnp.take_along_axis(y.reshape(y.shape[0], -1), index[:, None], axis=1)[:, 0]
    coords = jnp.where(found[:, None], xy, jnp.asarray(backup, jnp.float32))
    labels = jnp.where(found, label.astype(jnp.int32), 1)
    return coords, labels


def append_point(
    coords: Float[Array, "m k 2"] | None,
    labels: Int[Array, "m k"] | None,
    new_coords: Float[Array, "m 2"],
    new_labels: Int[Array, " m"],
) -> tuple[Float[Array, "m k1 2"], Int[Array, "m k1"]]:
    """Append one point per mask at the end of the lists (docs/sum.md §5.3); earlier entries stay.

    Args:
        coords: (M, k, 2) points so far, or None when round 1 used a box (no points yet).
        labels: (M, k) labels so far, or None.
        new_coords: (M, 2) the new points.
        new_labels: (M,) their labels.

    Returns:
        (M, k + 1, 2) coords and (M, k + 1) labels (k = 0 when starting from None).
    """
    new_coords = jnp.asarray(new_coords, jnp.float32)[:, None, :]
    new_labels = jnp.asarray(new_labels, jnp.int32)[:, None]
    if coords is None:
        return new_coords, new_labels
    return (
        jnp.concatenate([coords, new_coords], axis=1),
        jnp.concatenate([labels, new_labels], axis=1),
    )


def box_from_mask(y: Array) -> Float[Array, "m 4"]:
    """Tight box (x_min, y_min, x_max, y_max) of each mask, inclusive pixel indices (§5.5).

    Args:
        y: (M, H, W) binary masks.

    Returns:
        (M, 4) float32 boxes; an empty mask gives (0, 0, 0, 0).
    """
    y = jnp.asarray(y).astype(bool)
    _, h, w = y.shape
    rows, cols = jnp.any(y, axis=2), jnp.any(y, axis=1)  # (M, H), (M, W)
    y_min = jnp.argmax(rows, axis=1)
    y_max = h - 1 - jnp.argmax(rows[:, ::-1], axis=1)
    x_min = jnp.argmax(cols, axis=1)
    x_max = w - 1 - jnp.argmax(cols[:, ::-1], axis=1)
    box = jnp.stack([x_min, y_min, x_max, y_max], axis=-1).astype(jnp.float32)
    return jnp.where(jnp.any(rows, axis=1)[:, None], box, 0.0)


def jitter_box(
    key: jax.Array,
    boxes: Float[Array, "m 4"],
    bounds_hw: Int[Array, "m 2"],
    mode: str = "sum",
    std_frac: float = 0.1,
    max_px: float = 20.0,
) -> Float[Array, "m 4"]:
    """Box-prompt jitter (docs/sum.md §5.5, A14), per box, then clip x to [0, W] and y to [0, H].

    "sum" replicates the reference: eps_x, eps_y ~ N(0, 1); one non-negative shift per axis,
    d_x = clip(std_frac * (x_max - x_min) * eps_x, 0, max_px) (d_y likewise with the height),
    added to both corners (a translation down/right that keeps the size unless clipped).
    "sam" is SAM's symmetric jitter: each of the 4 coordinates gets its own noise
    clip(std_frac * side * eps, -max_px, max_px), side = width for x and height for y (the
    cap is applied to the noise value, not only to its std); the corners are then re-ordered
    so x_min <= x_max and y_min <= y_max.

    Args:
        key: PRNG key; box m uses fold_in(key, m).
        boxes: (M, 4) (x_min, y_min, x_max, y_max).
        bounds_hw: (M, 2) or (2,) image sizes (H, W) for the final clip (the valid region).
        mode: "sum" or "sam".
        std_frac: noise std as a fraction of the side (0.1).
        max_px: cap in pixels (20).

    Returns:
        (M, 4) float32 jittered boxes.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    keys = _mask_keys(key, boxes.shape[0])
    size = jnp.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=-1)  # (M, 2)
    if mode == "sum":
        eps = jax.vmap(lambda k: jax.random.normal(k, (2,)))(keys)  # (M, 2)
        shift = jnp.clip(std_frac * size * eps, 0.0, max_px)
        out = boxes + jnp.concatenate([shift, shift], axis=-1)
    elif mode == "sam":
        eps = jax.vmap(lambda k: jax.random.normal(k, (4,)))(keys)  # (M, 4)
        side = jnp.concatenate([size, size], axis=-1)
        out = boxes + jnp.clip(std_frac * side * eps, -max_px, max_px)
        out = jnp.concatenate(
            [jnp.minimum(out[:, :2], out[:, 2:]), jnp.maximum(out[:, :2], out[:, 2:])], axis=-1
        )
    else:
        raise ValueError(f"box_jitter must be 'sum' or 'sam', got {mode!r}")
    bounds = jnp.broadcast_to(jnp.asarray(bounds_hw, jnp.float32), (boxes.shape[0], 2))
    upper = jnp.stack([bounds[:, 1], bounds[:, 0], bounds[:, 1], bounds[:, 0]], axis=-1)
    return jnp.clip(out, 0.0, upper)
