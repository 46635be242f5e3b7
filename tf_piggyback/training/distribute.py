"""The one place a `tf.distribute.Strategy` is made; the trainer is handed the result."""

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")


def make_strategy(name="default"):
    """`default` (one device), `mirrored` (every local GPU, or every logical CPU), or `multi_worker`.

    `multi_worker` reads the cluster from the `TF_CONFIG` environment variable, as
    `tf.distribute.MultiWorkerMirroredStrategy` does; every worker runs the same command.

    Example:
    >>> strategy = make_strategy("mirrored")
    >>> strategy.num_replicas_in_sync >= 1
    True
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":  # every GPU; without GPUs, every logical CPU device
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        try:
            json.loads(os.environ.get("TF_CONFIG", ""))["cluster"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                "strategy multi_worker needs TF_CONFIG, e.g. "
                '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
            ) from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}. Received: strategy={name!r}")
