"""Storing masks in few bytes: 1 bit per parameter, or Rice-coded runs when that is smaller.

A binary mask with a fraction `p` of its minority value costs at best `n * H(p)` bits
(H the binary entropy). Plain bits cost `n` bits. Rice coding the gaps between minority
values comes within a few percent of `n * H(p)` for the sparsities the paper reports
(4-34%, Table 6 and Fig. 3) and is fully vectorized both ways: the fixed-width remainders
and the unary quotients go to two separate streams, so decoding needs no bit-serial loop.
"""

import numpy as np

MAX_RICE_K = 31


def entropy_bits(mask):
    """`n * H(p)` in bits: the bound for coding `mask` with one probability per layer."""
    mask = np.asarray(mask).ravel()
    n = mask.size
    bits = 0.0
    for value in np.unique(mask):
        p = np.count_nonzero(mask == value) / n
        bits -= n * p * np.log2(p)
    return bits


def mask_bits(mask, mask_type):
    """A mask's bits in the one order every stored and served form uses (task files, `TaskBank`,
    TFLite, on-device export): binary masks 1 bit a value; ternary masks 2 bits a value, the code
    value + 1 (0, 1, 2), high bit first. Packed with `np.packbits`: MSB first."""
    flat = np.asarray(mask, dtype=np.int8).ravel()
    if mask_type == "ternary":
        codes = (flat + 1).astype(np.uint8)
        return np.stack([codes >> 1, codes & 1], axis=-1).ravel()
    return flat.view(np.uint8)  # 0 and 1 are the same bytes: no copy


def pack(mask, mask_type):
    """`mask_bits` packed 8 to a byte (uint8 array)."""
    return np.packbits(mask_bits(mask, mask_type))


def unpack(packed, count, mask_type):
    """Inverse of `pack`: the first `count` mask values (int8) of uint8 `packed`."""
    packed = np.asarray(packed, np.uint8)
    if mask_type == "ternary":
        bits = np.unpackbits(packed, count=2 * count).reshape(count, 2)
        return (bits[:, 0] * 2 + bits[:, 1]).astype(np.int8) - 1
    return np.unpackbits(packed, count=count).astype(np.int8)


def encode(mask, mask_type):
    """Encodes an int8 mask; returns `(payload bytes, info dict for the manifest)`."""
    flat = np.asarray(mask, dtype=np.int8).ravel()
    if mask_type == "ternary":
        return pack(flat, "ternary").tobytes(), {"coding": "bits2"}
    plain = pack(flat, "binary").tobytes()
    ones = int(np.count_nonzero(flat))
    symbol = 0 if ones >= flat.size - ones else 1
    positions = np.flatnonzero(flat == symbol).astype(np.int64)
    if positions.size == 0:
        return b"", {"coding": "constant", "value": 1 - symbol}
    gaps = np.diff(positions, prepend=-1) - 1
    k = _best_rice_k(gaps)
    rice = _rice_encode(gaps, k)
    if len(rice) < len(plain):
        return rice, {"coding": "rice", "symbol": symbol, "count": int(positions.size), "k": k}
    return plain, {"coding": "bits"}


def decode(payload, info, shape):
    """Inverse of `encode`: the int8 mask of `shape` from its payload and manifest info."""
    n = int(np.prod(shape, dtype=np.int64))
    buf = np.frombuffer(payload, dtype=np.uint8)
    coding = info["coding"]
    if coding == "bits":
        flat = unpack(buf, n, "binary")
    elif coding == "bits2":
        flat = unpack(buf, n, "ternary")
    elif coding == "constant":
        flat = np.full(n, info["value"], dtype=np.int8)
    elif coding == "rice":
        symbol, count = int(info["symbol"]), int(info["count"])
        gaps = _rice_decode(buf, count, int(info["k"]))
        positions = np.cumsum(gaps + 1) - 1
        if positions.size and (positions[-1] >= n or positions.min() < 0):
            raise ValueError("Rice-coded mask positions run past the layer's size")
        flat = np.full(n, 1 - symbol, dtype=np.int8)
        flat[positions] = symbol
    else:
        raise ValueError(f"unknown mask coding {coding!r}")
    return flat.reshape(shape)


def _best_rice_k(gaps):
    costs = [int(np.sum(gaps >> k)) + gaps.size * (k + 1) for k in range(MAX_RICE_K + 1)]
    return int(np.argmin(costs))


def _rice_encode(gaps, k):
    """Remainder stream (k bits per gap, byte-padded), then the unary quotient stream."""
    remainders = np.zeros(0, dtype=np.uint8)
    if k:
        shifts = np.arange(k - 1, -1, -1, dtype=np.int64)
        remainders = ((gaps[:, None] >> shifts) & 1).astype(np.uint8).ravel()
    quotients = gaps >> k
    unary = np.ones(int(quotients.sum()) + gaps.size, dtype=np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 0
    return np.packbits(remainders).tobytes() + np.packbits(unary).tobytes()


def _rice_decode(buf, count, k):
    remainder_bytes = (count * k + 7) // 8
    if remainder_bytes > buf.size:
        raise ValueError("Rice-coded mask is shorter than its remainder stream")
    gaps = np.zeros(count, dtype=np.int64)
    if k:  # high bit first; k shifts of the column vector (2-3x faster than a matrix product with 2^j)
        bits = np.unpackbits(buf[:remainder_bytes], count=count * k).reshape(count, k)
        gaps = bits[:, 0].astype(np.int64)
        for column in range(1, k):
            gaps <<= 1
            gaps |= bits[:, column]
    ends = np.flatnonzero(np.unpackbits(buf[remainder_bytes:]) == 0)[:count]
    if ends.size < count:
        raise ValueError("Rice-coded mask is shorter than its quotient stream")
    quotients = np.diff(ends, prepend=-1) - 1
    return (quotients << k) | gaps


# Bit k (MSB first) of an int32 word w is floor(floor(w / D_k) mod M_k / S_k). Bit 31, the sign
# bit, reads off floor(w / 2^30), which is -2, -1, 0 or 1; 2^31 does not fit in an int32.
_WORD_DIVISORS = [2 ** 30] + [2 ** k for k in range(30, -1, -1)]
_WORD_MODULI = [4] + [2] * 31
_WORD_SHIFTS = [2] + [1] * 31


def pack_words(mask, mask_type):
    """`coding.mask_bits` as int32 words, 32 bits each, MSB first: what a multi-task `.tflite`
    stores per kernel."""
    bits = mask_bits(mask, mask_type)
    return np.packbits(np.pad(bits, (0, -bits.size % 32))).view(">i4").astype(np.int32)


def unpack_words(words, count):
    """int32 words -> `count` float bits, MSB first, with floor-div/mod only (TFLite builtins):
    a multi-task `.tflite` unpacks its masks so.

    The words are int32 already: a uint8 payload needed a cast to int32, which the TFLite
    converter constant-folds, storing every task's masks 4 times over (measured: 10 ResNet-50
    tasks gave a 213 MB file where one task's is 94 MB). TFLite has no BitwiseAnd, and the
    converter also folds a table lookup (gather) of constant bytes into full kernels.
    """
    import tensorflow as tf

    bits = tf.math.floordiv(tf.math.floormod(tf.math.floordiv(words[:, None], _WORD_DIVISORS), _WORD_MODULI),
                            _WORD_SHIFTS)
    return tf.cast(tf.reshape(bits, [-1])[:count], tf.float32)
