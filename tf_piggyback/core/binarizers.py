"""Thresholding of real-valued masks with a straight-through gradient.

Reference: Mallya et al., "Piggyback", ECCV 2018, §3, Eq. 4 (binary mask) and the
ternary variant at the end of §3; Eq. 5-7 give the gradient that flows through.
"""

import numpy as np
import tensorflow as tf

MASK_TYPES = ("binary", "ternary")
DEFAULT_THRESHOLD = 5e-3
# The valid thresholds: (0, MAX_THRESHOLD]. Bounded so that `real_from_mask`'s 2 * tau, and any
# m_r an optimizer moves past tau, stay far inside float32.
MAX_THRESHOLD = 1e3


def validate_threshold(threshold):
    """Returns `threshold` as a float, or raises a one-line ValueError."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= MAX_THRESHOLD:
        raise ValueError(
            f"threshold must be a number in (0, {MAX_THRESHOLD:g}] (the paper uses 5e-3). Received: threshold={threshold!r}"
        )
    return float(threshold)


def real_from_mask(mask, threshold):
    """Real-valued masks `m_r` that threshold back to `mask` (binary or ternary) at `threshold`.

    A stored mask holds only {0, 1} (or {-1, 0, 1}); loading it writes `2 tau` for 1, 0 for 0
    and `-tau` for -1, which Eq. 4 (and the ternary cut-offs 0 and tau) map back to the same
    mask for every valid `tau` — writing the mask values themselves gave an all-zero mask for
    any tau above 1.

    Example:
    >>> real_from_mask(np.array([-1, 0, 1]), 5.0)
    array([-5.,  0., 10.], dtype=float32)
    """
    mask = np.asarray(mask)
    return np.where(mask > 0, 2.0 * threshold, np.where(mask < 0, -threshold, 0.0)).astype(np.float32)


def validate_mask_type(mask_type):
    if mask_type not in MASK_TYPES:
        raise ValueError(
            f"mask_type must be one of {', '.join(MASK_TYPES)}. Received: mask_type={mask_type!r}"
        )
    return mask_type


@tf.custom_gradient
def binarize(mask_real, threshold):
    """`1` where `mask_real >= threshold`, else `0` (Eq. 4); straight-through gradient.

    Args:
        mask_real: float tensor, the real-valued mask `m_r` (pass
            `tf.convert_to_tensor(variable)`, not the variable).
        threshold: scalar float tensor, `tau`.

    Returns:
        A tensor of the same shape and dtype with values in {0, 1}. Its gradient
        with respect to `mask_real` is the incoming gradient unchanged (§3:
        "we update m_r using gradients computed for m").

    Example:
    >>> binarize(tf.constant([0.0, 0.005, 0.01]), tf.constant(5e-3)).numpy()
    array([0., 1., 1.], dtype=float32)
    """
    mask = tf.cast(mask_real >= threshold, mask_real.dtype)

    def grad(upstream):
        return upstream, tf.zeros_like(threshold)

    return mask, grad


@tf.custom_gradient
def ternarize(mask_real, threshold):
    """`-1` where `mask_real < 0`, `1` where `mask_real >= threshold`, else `0`.

    The ternary masks of §3 with the two cut-offs of the official code (0 and tau);
    straight-through gradient as in `binarize`.

    Example:
    >>> ternarize(tf.constant([-0.1, 0.001, 0.01]), tf.constant(5e-3)).numpy()
    array([-1.,  0.,  1.], dtype=float32)
    """
    positive = tf.cast(mask_real >= threshold, mask_real.dtype)
    negative = tf.cast(mask_real < 0, mask_real.dtype)

    def grad(upstream):
        return upstream, tf.zeros_like(threshold)

    return positive - negative, grad


def threshold_mask(mask_real, threshold, mask_type):
    """The thresholded mask as a tensor, straight-through differentiable."""
    fn = binarize if mask_type == "binary" else ternarize
    mask_real = tf.convert_to_tensor(mask_real)
    return fn(mask_real, tf.constant(threshold, dtype=mask_real.dtype))


def threshold_mask_numpy(mask_real, threshold, mask_type):
    """NumPy twin of `threshold_mask` that returns int8 values, for storage."""
    mask_real = np.asarray(mask_real)
    mask = (mask_real >= threshold).astype(np.int8)
    if mask_type == "ternary":
        mask -= (mask_real < 0).astype(np.int8)
    return mask
