"""SUM's uncertainty-aware focal + dice + IoU-head loss (docs/sum.md §6), pure jnp.

Every function works on the padded frame (M, S, S) with static shapes. The valid (unpadded)
region of each mask's image is given as per-mask sizes `valid_hw` (M, 2) int = (h, w): pixel
(r, c) counts iff r < h and c < w. Pixels outside are excluded from every sum and from the
normaliser, so the padded computation equals the computation on the cropped (h, w) arrays.
`valid_hw=None` means the whole frame is valid. With U = None (or U = 0) the focal and dice
terms reduce to the plain SAM focal/dice loss (human labels, AM-SAM/BLO-SAM).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from amsam_jax.modeling.common import _linear_indices


@dataclasses.dataclass(frozen=True)
class SumLossConfig:
    """Loss hyper-parameters (docs/sum.md §11). Hashable, so it can be a static jit argument.

    Attributes:
        lambda_focal: weight of the focal term (20).
        lambda_dice: weight of the dice term (1).
        lambda_iou: weight of the IoU-head MSE (1); ignored when no `iou_pred` is given.
        focal_alpha: torchvision's alpha (0.25).
        focal_gamma: torchvision's gamma (2).
        dice_smooth: additive smoothing of the dice ratio (1).
        dice_uncertainty_threshold: a pixel enters the hard dice iff (1 - U) > threshold (0.5,
            i.e. U < 0.5; U = 0.5 is excluded).
        dice_mode: "hard" (the reference's used variant) or "soft" (y and s times 1 - U; the
            reference's unused variant).
        use_uncertainty: False ignores U (the "Vanilla" ablation: U treated as 0).
    """

    lambda_focal: float = 20.0
    lambda_dice: float = 1.0
    lambda_iou: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_smooth: float = 1.0
    dice_uncertainty_threshold: float = 0.5
    dice_mode: str = "hard"
    use_uncertainty: bool = True


def upsample_logits(
    low_res: Float[Array, "m l l"], size: int | tuple[int, int]
) -> Float[Array, "m s s"]:
    """Bilinear, half-pixel-centre upsampling (PyTorch align_corners=False) of low-res logits.

    Args:
        low_res: (M, L, L) decoder logits over the padded frame (L = 256 for SAM).
        size: S or (S_h, S_w), the padded input frame (1024 for SAM).

    Returns:
        (M, S, S) logits; crop to (h, w) or use `valid_hw` downstream.
    """
    if isinstance(size, int):
        size = (size, size)
    rows = interpolation_matrix(low_res.shape[-2], size[0])
    cols = interpolation_matrix(low_res.shape[-1], size[1])
    # Two matmuls: the same weights as resize_bilinear (equal up to float rounding), but its
    # gradient is two matmuls too, not a scatter-add (5x faster through the loss at 1024²).
    return jnp.einsum("oh,...hw,pw->...op", rows, low_res, cols)


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of PyTorch's linear interpolation (align_corners=False)."""
    i0, i1, lam = _linear_indices(in_size, out_size)
    a = np.zeros((out_size, in_size), np.float32)
    np.add.at(a, (np.arange(out_size), i0), 1.0 - lam)
    np.add.at(a, (np.arange(out_size), i1), lam)
    return a


def valid_mask(valid_hw: Int[Array, "m 2"] | None, shape: tuple[int, ...]) -> jax.Array:
    """(M, H, W) bool, True on rows < h and columns < w of each mask (all True if None).

    Args:
        valid_hw: (M, 2) int valid sizes (h, w) per mask, or None for the full frame.
        shape: (M, H, W), the padded frame.

    Returns:
        (M, H, W) bool.
    """
    m, h, w = shape
    if valid_hw is None:
        return jnp.ones((m, h, w), bool)
    valid_hw = jnp.asarray(valid_hw)
    rows = jnp.arange(h)[None, :, None] < valid_hw[:, 0, None, None]  # (M, H, 1)
    cols = jnp.arange(w)[None, None, :] < valid_hw[:, 1, None, None]  # (M, 1, W)
    return rows & cols


def _num_valid(valid_hw: Int[Array, "m 2"] | None, shape: tuple[int, ...]) -> jax.Array:
    """h * w per mask, at least 1 so that an empty padding mask (0, 0) gives 0, not NaN."""
    m, h, w = shape
    if valid_hw is None:
        return jnp.full((m,), h * w, jnp.float32)
    valid_hw = jnp.asarray(valid_hw)
    return jnp.maximum(valid_hw[:, 0] * valid_hw[:, 1], 1).astype(jnp.float32)


def _target(y: Array, dtype) -> jax.Array:
    """Binary target as floats: integer/bool masks are nonzero-is-foreground (uint8 0/255 too)."""
    y = jnp.asarray(y)
    if jnp.issubdtype(y.dtype, jnp.floating):
        return y.astype(dtype)
    return (y != 0).astype(dtype)


def _uncertainty(uncertainty: jax.Array | None, like: jax.Array) -> jax.Array:
    if uncertainty is None:
        return jnp.zeros_like(like)
    return jnp.asarray(uncertainty, like.dtype)


def sigmoid_focal_pixels(
    logits: Float[Array, "m h w"], y: Array, alpha: float = 0.25, gamma: float = 2.0
) -> Float[Array, "m h w"]:
    """Per-pixel torchvision sigmoid focal loss (reduction "none"), stable from logits.

    ce is BCE-with-logits (softplus form), and 1 - p_t = sigmoid(x * (1 - 2y)) for binary y,
    which equals torchvision's 1 - (s*y + (1-s)*(1-y)) without the cancellation at large |x|.

    Args:
        logits: (M, H, W) logits x.
        y: (M, H, W) binary targets: bool, integer (nonzero = 1, so uint8 0/255 works) or
            float in {0, 1}.
        alpha: weight of the positive class.
        gamma: focusing exponent.

    Returns:
        (M, H, W) float32 focal loss per pixel.
    """
    y = _target(y, logits.dtype)
    # z = x (1 - 2y): ce = softplus(z) (= max(x, 0) - x y + log1p(exp(-|x|)) for binary y) and
    # 1 - p_t = sigmoid(z) share one exp(-|z|); gamma = 2 squares instead of calling pow.
    z = logits * (1.0 - 2.0 * y)
    e = jnp.exp(-jnp.abs(z))
    ce = jnp.maximum(z, 0.0) + jnp.log1p(e)
    one_minus_pt = jnp.where(z >= 0, 1.0, e) / (1.0 + e)
    alpha_t = alpha * y + (1.0 - alpha) * (1.0 - y)
    mod = one_minus_pt * one_minus_pt if gamma == 2.0 else one_minus_pt**gamma
    return alpha_t * mod * ce


def focal_loss_per_mask(
    logits: Float[Array, "m h w"],
    y: Array,
    uncertainty: Float[Array, "m h w"] | None = None,
    valid_hw: Int[Array, "m 2"] | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Float[Array, " m"]:
    """L_focal per mask = (1 / (h*w)) * sum over valid pixels of (1 - U) * FL (docs/sum.md §6.1).

    The normaliser is the number of valid pixels, never sum(1 - U).

    Args:
        logits: (M, H, W) upsampled logits on the padded frame.
        y: (M, H, W) binary targets.
        uncertainty: (M, H, W) U in [0, 1], or None for U = 0.
        valid_hw: (M, 2) valid sizes (h, w), or None for the full frame.
        alpha: focal alpha.
        gamma: focal gamma.

    Returns:
        (M,) focal loss per mask.
    """
    u = _uncertainty(uncertainty, logits)
    fl = sigmoid_focal_pixels(logits, y, alpha, gamma) * (1.0 - u)
    fl = jnp.where(valid_mask(valid_hw, logits.shape), fl, 0.0)
    return jnp.sum(fl, axis=(1, 2)) / _num_valid(valid_hw, logits.shape)


def dice_loss_per_mask(
    logits: Float[Array, "m h w"],
    y: Array,
    uncertainty: Float[Array, "m h w"] | None = None,
    valid_hw: Int[Array, "m 2"] | None = None,
    smooth: float = 1.0,
    threshold: float = 0.5,
    mode: str = "hard",
) -> Float[Array, " m"]:
    """L_dice per mask = 1 - (2 I + smooth) / (S + smooth) over certain pixels (docs/sum.md §6.2).

    "hard": k = 1[(1 - U) > threshold] and valid; I = sum k*y*s, S = sum k*y + sum k*s.
    "soft": y and s are multiplied by (1 - U) on valid pixels (unused by the reference).

    Args:
        logits: (M, H, W) upsampled logits on the padded frame.
        y: (M, H, W) binary targets.
        uncertainty: (M, H, W) U in [0, 1], or None for U = 0.
        valid_hw: (M, 2) valid sizes (h, w), or None for the full frame.
        smooth: additive smoothing.
        threshold: certainty threshold of the hard mask.
        mode: "hard" or "soft".

    Returns:
        (M,) dice loss per mask.
    """
    u = _uncertainty(uncertainty, logits)
    s = jax.nn.sigmoid(logits)
    yf = _target(y, logits.dtype)
    valid = valid_mask(valid_hw, logits.shape)
    if mode == "hard":
        k = (valid & ((1.0 - u) > threshold)).astype(logits.dtype)
    elif mode == "soft":
        k = jnp.where(valid, 1.0 - u, 0.0)
    else:
        raise ValueError(f"dice_mode must be 'hard' or 'soft', got {mode!r}")
    # Soft: the reference multiplies y and s by (1 - U) each, so I carries (1 - U)^2.
    ys, ss = k * yf, k * s
    inter = jnp.sum(ys * ss, axis=(1, 2))
    total = jnp.sum(ys, axis=(1, 2)) + jnp.sum(ss, axis=(1, 2))
    return 1.0 - (2.0 * inter + smooth) / (total + smooth)


def iou_target(
    logits: Float[Array, "m h w"], y: Array, valid_hw: Int[Array, "m 2"] | None = None
) -> Float[Array, " m"]:
    """IoU of the thresholded prediction (s >= 0.5, i.e. x >= 0) with y, no gradient (§6.3).

    Args:
        logits: (M, H, W) upsampled logits on the padded frame.
        y: (M, H, W) binary targets (the plain, unmasked pseudo-label for SA-1B).
        valid_hw: (M, 2) valid sizes (h, w), or None for the full frame.

    Returns:
        (M,) IoU targets, 0 for an empty prediction and an empty target.
    """
    logits = jax.lax.stop_gradient(logits)
    valid = valid_mask(valid_hw, logits.shape)
    pred = (jax.nn.sigmoid(logits) >= 0.5) & valid
    yb = (_target(y, jnp.float32) > 0.5) & valid
    inter = jnp.sum(pred & yb, axis=(1, 2)).astype(jnp.float32)
    union = jnp.sum(pred, axis=(1, 2)) + jnp.sum(yb, axis=(1, 2)) - inter
    return inter / (union + 1e-7)


def sum_loss(
    logits: Float[Array, "m h w"],
    y: Array,
    uncertainty: Float[Array, "m h w"] | None = None,
    valid_hw: Int[Array, "m 2"] | None = None,
    iou_pred: Float[Array, " m"] | None = None,
    mask_weight: Float[Array, " m"] | None = None,
    cfg: SumLossConfig = SumLossConfig(),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = lambda_focal * focal + lambda_dice * dice + lambda_iou * iou, averaged over masks.

    Args:
        logits: (M, H, W) upsampled logits on the padded frame (see `upsample_logits`).
        y: (M, H, W) binary targets.
        uncertainty: (M, H, W) U in [0, 1], or None for U = 0 (human labels).
        valid_hw: (M, 2) valid sizes (h, w) per mask, or None for the full frame.
        iou_pred: (M,) IoU-head predictions, or None to drop the IoU term.
        mask_weight: (M,) 1 for real masks and 0 for padding masks (a static mask count), or
            None for all ones. The average is sum(weight * L) / max(sum(weight), 1). A padding
            mask may have valid_hw (0, 0): its terms are finite (focal 0).
        cfg: hyper-parameters; a static argument under jit.

    Returns:
        (loss scalar, metrics) with metrics "focal", "dice", "iou" (weighted means per mask)
        and "loss".
    """
    u = uncertainty if cfg.use_uncertainty else None
    focal = focal_loss_per_mask(logits, y, u, valid_hw, cfg.focal_alpha, cfg.focal_gamma)
    dice = dice_loss_per_mask(
        logits, y, u, valid_hw, cfg.dice_smooth, cfg.dice_uncertainty_threshold, cfg.dice_mode
    )
    if iou_pred is None:
        iou = jnp.zeros_like(focal)
    else:
        iou = jnp.square(iou_pred - iou_target(logits, y, valid_hw))
    per_mask = cfg.lambda_focal * focal + cfg.lambda_dice * dice + cfg.lambda_iou * iou
    if mask_weight is None:
        mask_weight = jnp.ones_like(focal)
    denom = jnp.maximum(jnp.sum(mask_weight), 1.0)

    def mean(v):
        return jnp.sum(mask_weight * v) / denom

    loss = mean(per_mask)
    return loss, {"loss": loss, "focal": mean(focal), "dice": mean(dice), "iou": mean(iou)}


def reference_focal_loss(logits: jax.Array, y: jax.Array, alpha=0.25, gamma=2.0) -> jax.Array:
    """Plain torchvision sigmoid_focal_loss, literal formula, mean over pixels, per mask (M,).

    An independent check of `focal_loss_per_mask` at U = 0 (tests only rely on it).
    """
    y = y.astype(logits.dtype)
    p = jax.nn.sigmoid(logits)
    ce = -(y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits))
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss.reshape(loss.shape[0], -1).mean(axis=1)


def reference_dice_loss(logits: jax.Array, y: jax.Array, smooth=1.0) -> jax.Array:
    """Plain SAM-style dice loss with smoothing, per mask (M,): 1 - (2 I + 1) / (|y| + |s| + 1)."""
    p = jax.nn.sigmoid(logits).reshape(logits.shape[0], -1)
    t = y.astype(logits.dtype).reshape(y.shape[0], -1)
    return 1 - (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)
