"""How a bank packs a task's masks (BUILD.md, "Many tasks in one SavedModel"): `PackedLayout`, the one
description that `TaskBank` packs with, `versions.BankModule` unpacks with and an export's listing
records; the uid entries that end a slot (`ID_BITS`), and unpacking in TensorFlow (one gather from
bytes straight to floats).

Reference: §3, last paragraph (only the thresholded masks are kept: 1 bit per parameter).
"""

import dataclasses

import numpy as np
import tensorflow as tf

from tf_piggyback.core import coding

KINDS = {"none": 0, "binary": 1, "ternary": 2}
# Each kernel starts at a multiple of 16 floats (64 bytes) in the flat slot, so slicing it out
# shares the slot's buffer instead of copying it (TensorFlow's aligned dim-0 slices).
ALIGN = 16
# A slot's last ID_BITS entries say whose kernels it holds: there `W` is 2^15 ... 2^0 and each
# task's masks are the bits of its id, so the entries sum to the id (exact in float32). The fill
# is then one multiplication, done in place; writing the id afterwards would copy the slot.
# ID_BITS = ALIGN keeps the kernels after them aligned.
ID_BITS = ALIGN
ID_WEIGHTS = 2.0 ** np.arange(ID_BITS - 1, -1, -1, dtype=np.float32)
MAX_UID = 2 ** ID_BITS - 1


def aligned(size):
    """`size` rounded up to a multiple of ALIGN."""
    return -(-size // ALIGN) * ALIGN


# Every byte's 8 binary mask values, or 4 ternary ones (`coding.unpack`, the one bit order):
# unpacking is one gather straight to floats, with no byte-sized intermediates.
_BYTES = np.arange(256, dtype=np.uint8)[:, None]
_BITS = np.stack([coding.unpack(byte, 8, "binary") for byte in _BYTES]).astype(np.float32)
_TERNARY = np.stack([coding.unpack(byte, 4, "ternary") for byte in _BYTES]).astype(np.float32)


def unpack_binary(packed):
    """uint8 bytes -> float mask values in {0, 1}, 8 per byte (`coding.unpack` in TensorFlow)."""
    return tf.reshape(tf.gather(tf.constant(_BITS), tf.cast(packed, tf.int32)), [-1])


def unpack_ternary(packed):
    """uint8 bytes -> float mask values in {-1, 0, 1}, 4 per byte (`coding.unpack` in TensorFlow)."""
    return tf.reshape(tf.gather(tf.constant(_TERNARY), tf.cast(packed, tf.int32)), [-1])


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """How a bank packs a task's masks: each kernel of `kernels` (`(path, size)`, in the backbone's
    order) in turn, padded to a multiple of `ALIGN` values, then the task's uid in `ID_BITS`
    values; 8 values a byte for binary masks, 4 for ternary (`coding.pack`). The one description
    that `TaskBank` packs with, `BankModule` unpacks with and an export's listing records
    (`TaskBank.add_all(previous=...)` reads tasks back with it)."""

    kernels: tuple

    @property
    def paths(self):
        return [path for path, _ in self.kernels]

    @property
    def flat_size(self):
        """Floats in one slot's kernels (each aligned), without the id entries."""
        return sum(aligned(size) for _, size in self.kernels)

    def pack(self, masks, kind, uid=None):
        """`{kernel path: packed, aligned mask}` of a task (a kernel it does not mask is all ones)
        and its uid (None: without it, as a task's file holds it, `store`) -> one uint8 array
        (empty for a classifier-only task, `kind` "none")."""
        if kind == "none":
            return np.zeros(0, np.uint8)
        segments = [masks[path] if path in masks else coding.pack(np.ones(aligned(size), np.int8), kind)
                    for path, size in self.kernels]
        return np.concatenate(segments + ([] if uid is None else [self.id_bytes(uid, kind)]))

    @staticmethod
    def id_bytes(uid, kind):
        """The packed id entries that end a task's packed masks (`ID_WEIGHTS`): 2 bytes for
        binary masks, 4 for ternary."""
        return coding.pack(np.unpackbits(np.array([uid], ">u2").view(np.uint8)).astype(np.int8), kind)

    def split(self, packed, kind):
        """Inverse of `pack`, less the uid: `{kernel path: packed, aligned mask}`."""
        per_byte = 8 if kind == "binary" else 4
        masks, offset = {}, 0
        for path, size in self.kernels:
            masks[path] = packed[offset:offset + aligned(size) // per_byte].copy()
            offset += aligned(size) // per_byte
        return masks
