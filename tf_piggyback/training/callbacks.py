"""Keras callbacks that give `model.fit` on a task model what `trainer.train` does for the CLI:
the masks' sparsity in the logs (so `TensorBoard`, `History` and `EarlyStopping` see it) and the
divergence and chance-level checks (BUILD.md, "Keras' front door").

Example:
>>> import keras, tf_piggyback as pb
>>> (x, y), _, _ = pb.load_digits_variant("upper")
>>> model = pb.piggyback(pb.digits_backbone(), 5)
>>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
>>> history = model.fit(x[:64], y[:64], epochs=1, verbose=0,
...                     callbacks=[pb.MaskSparsity(), pb.TrainingMonitor(labels=y[:64])])
>>> 0.0 <= history.history["mask_sparsity"][-1] < 0.05   # the masks start all 1 (§3)
True

Reference: §4 "Training details"; Fig. 3 (sparsity per layer).
"""

import logging
import math

import keras
import numpy as np
import tensorflow as tf

from tf_piggyback.core.surgery import masked_layers
from tf_piggyback.training.evaluation import sparsity_by_kernel
from tf_piggyback.training.trainer import at_chance, chance_levels


class MaskSparsity(keras.callbacks.Callback):
    """Adds `mask_sparsity` (the fraction of the task's mask bits that are 0) to each epoch's logs,
    and, with `log_dir`, writes each masked kernel's sparsity as a TensorBoard scalar
    (`sparsity/<kernel path>`, as `trainer.train`'s summaries).

    Put it before `keras.callbacks.TensorBoard` (and `EarlyStopping`, `CSVLogger`) in `callbacks`:
    Keras calls them in that order with one `logs` dict.

    Args:
        log_dir: optional folder for the per-kernel scalars, e.g. the `TensorBoard` callback's
            `log_dir` (they go to its `masks` subfolder).
    """

    def __init__(self, log_dir=None):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        if not masked_layers(self.model):
            return
        sparsities = sparsity_by_kernel(self.model)
        if logs is not None:
            logs["mask_sparsity"] = sparsities["overall"]
        if self.log_dir:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(f"{self.log_dir}/masks")
            with self._writer.as_default(step=epoch + 1):
                for path, sparsity in sparsities.items():
                    tf.summary.scalar(f"sparsity/{path}", sparsity)
            self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TrainingMonitor(keras.callbacks.Callback):
    """`trainer.train`'s checks for `model.fit`: stops at the first batch whose loss is NaN or inf
    (raising `FloatingPointError`, as the CLI does), and logs a warning after each epoch past the
    first that trained at chance level (`trainer.at_chance`; recorded in the logs as `at_chance`,
    1.0 or 0.0).

    Args:
        labels: optional training labels (or per-class counts with `counts=True`): chance is then
            a guess from the class frequencies; default: C balanced classes (C: the model's outputs).
        counts: whether `labels` are per-class counts.
        log: called with the warning line (default `logging.warning`).
    """

    def __init__(self, labels=None, counts=False, log=logging.warning):
        super().__init__()
        if labels is None:
            self.class_counts = None
        else:
            labels = np.asarray(labels)
            self.class_counts = labels.astype(np.float64) if counts else np.bincount(labels.reshape(-1).astype(np.int64))
        self.log = log
        self._losses = []

    def on_train_begin(self, logs=None):
        self._losses = []

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True
            raise FloatingPointError(
                f"loss became {float(loss)} in batch {batch + 1}: the training diverged; lower the optimizer's "
                f"learning rate (now {_learning_rate(self.model.optimizer)}) and train again from a new task model")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if "loss" not in logs:
            return
        counts = self.class_counts
        if counts is None:
            counts = np.ones(int(self.model.outputs[0].shape[-1]))
        chance_loss, chance_accuracy = chance_levels(counts)
        self._losses = (self._losses + [float(logs["loss"])])[-2:]
        accuracy = next((float(v) for k, v in logs.items() if k in ("accuracy", "sparse_categorical_accuracy")), None)
        # Without an accuracy metric, the loss alone (an accuracy of 1.0 is never at chance).
        stuck = epoch > 0 and at_chance(1.0 if accuracy is None else accuracy, chance_accuracy, self._losses,
                                        chance_loss)
        logs["at_chance"] = float(stuck)
        if stuck:
            self.log(f"epoch {epoch + 1} trained at chance level: loss {self._losses[-1]:.4f}"
                     + (f", accuracy {accuracy:.4f}" if accuracy is not None else "")
                     + f"; a guess from the class frequencies scores {chance_loss:.4f} and {chance_accuracy:.4f}. "
                     f"Not a result: check the optimizer's learning rate (now {_learning_rate(self.model.optimizer)})")


def _learning_rate(optimizer):
    """The optimizer's current rate as text, or "unknown" without one."""
    try:
        return f"{float(keras.ops.convert_to_numpy(optimizer.learning_rate)):g}"
    except (AttributeError, TypeError, ValueError):
        return "unknown"
