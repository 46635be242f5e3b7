"""A SHA-256 fingerprint of a backbone's weights, so a task is never applied to the wrong one."""

import hashlib

import keras
import numpy as np


def fingerprint(model):
    """Hex SHA-256 over every weight's dtype, shape and bytes, in the model's weight order.

    Layer names are left out on purpose: Keras numbers unnamed layers by creation order, so
    the same architecture and weights give the same fingerprint in any process.
    """
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.dtype.str}{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
