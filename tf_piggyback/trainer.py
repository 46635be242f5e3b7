"""The training loop: owns its steps (`strategy.run` / `strategy.reduce`) so the same code runs
on one device, under MirroredStrategy and under MultiWorkerMirroredStrategy (where Keras 3.15's
`model.fit` fails, keras#20585).

Reference: §4 "Training details" — Adam for masks and head, lr 1e-4, x0.1 after 15 of 30
epochs, batch 32; the finetuning baseline uses SGD with momentum and lr 1e-3.
"""

import dataclasses
import time

import keras
import numpy as np
import tensorflow as tf

from tf_piggyback.surgery import masked_layers

METHODS = ("piggyback", "classifier", "finetune")


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of one training run; defaults are the paper's (§4)."""

    method: str = "piggyback"
    epochs: int = 30
    batch_size: int = 32
    mask_lr: float = 1e-4
    head_lr: float = 1e-4
    finetune_lr: float = 1e-3
    lr_decay_epochs: int = 15
    lr_decay: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}. Received: method={self.method!r}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be an integer > 0. Received: {name}={value!r}")
        for name in ("mask_lr", "head_lr", "finetune_lr", "lr_decay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0. Received: {name}={getattr(self, name)!r}")


def numpy_dataset(x, y, batch_size, *, shuffle=False, seed=0):
    """A batched `tf.data.Dataset` of `(image, label)` from NumPy arrays."""
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _schedule(lr, config, steps_per_epoch):
    boundary = config.lr_decay_epochs * steps_per_epoch
    return keras.optimizers.schedules.PiecewiseConstantDecay([boundary], [lr, lr * config.lr_decay])


def make_optimizers(model, config, steps_per_epoch):
    """`[(optimizer, variables), ...]`: one group per learning rate, as in §4."""
    if config.method == "finetune":
        sgd = keras.optimizers.SGD(_schedule(config.finetune_lr, config, steps_per_epoch), momentum=0.9)
        return [(sgd, list(model.trainable_variables))]
    masks = [m for layer in masked_layers(model) for m in layer.masks]
    mask_ids = {id(m) for m in masks}
    others = [v for v in model.trainable_variables if id(v) not in mask_ids]
    groups = [(keras.optimizers.Adam(_schedule(config.head_lr, config, steps_per_epoch)), others)]
    if masks:
        groups.insert(0, (keras.optimizers.Adam(_schedule(config.mask_lr, config, steps_per_epoch)), masks))
    return groups


def train(model, dataset, config, *, strategy=None, log=print):
    """Trains `model` on a batched `(image, label)` dataset for `config.epochs` epochs.

    Args:
        model: a task model (`piggyback`, `classifier_only` or `finetune`), created under
            `strategy.scope()` when a strategy is given.
        dataset: a `tf.data.Dataset` of global batches.
        config: a `TrainConfig`.
        strategy: a `tf.distribute.Strategy`; default the current (single-device) one.
        log: called with one line per epoch.

    Returns:
        A list with one dict per epoch: `epoch`, `loss`, `accuracy`, `seconds`.
    """
    strategy = strategy or tf.distribute.get_strategy()
    steps_per_epoch = int(dataset.cardinality())
    if steps_per_epoch <= 0:
        raise ValueError("the training dataset is empty or of unknown size; give it a known, finite length")
    with strategy.scope():
        groups = make_optimizers(model, config, steps_per_epoch)
    variables = [v for _, vs in groups for v in vs]

    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example)
        grads = tape.gradient(loss, variables)
        start = 0
        for optimizer, vs in groups:
            optimizer.apply_gradients(zip(grads[start:start + len(vs)], vs))
            start += len(vs)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), tf.cast(labels, tf.int64)), tf.float32))
        return tf.reduce_sum(per_example), correct, tf.cast(tf.size(labels), tf.float32)

    @tf.function
    def distributed_step(images, labels):
        results = strategy.run(step, args=(images, labels))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, r, axis=None) for r in results]

    history = []
    distributed = strategy.experimental_distribute_dataset(dataset)
    for epoch in range(config.epochs):
        start_time = time.time()
        totals = np.zeros(3)
        for images, labels in distributed:
            totals += [float(t) for t in distributed_step(images, labels)]
        loss, accuracy = totals[0] / totals[2], totals[1] / totals[2]
        if not np.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss} in epoch {epoch + 1}; lower the learning rates (mask_lr, head_lr)"
            )
        history.append({"epoch": epoch + 1, "loss": loss, "accuracy": accuracy, "seconds": time.time() - start_time})
        log(f"epoch {epoch + 1}/{config.epochs}  loss {loss:.4f}  accuracy {accuracy:.4f}  "
            f"({history[-1]['seconds']:.1f}s)")
    return history


def evaluate(model, x, y, batch_size=256):
    """Top-1 accuracy of `model` on NumPy arrays, in inference mode."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(y)))
