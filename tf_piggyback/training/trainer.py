"""The training loop: owns its steps (`strategy.run` / `strategy.reduce`) so the same code runs
on one device, under MirroredStrategy and under MultiWorkerMirroredStrategy (where Keras 3.15's
`model.fit` fails, keras#20585).

Reference: §4 "Training details" — Adam for masks and head, lr 1e-4, x0.1 after 15 of 30
epochs, batch 32; the finetuning baseline uses SGD with momentum and lr 1e-3.
"""

import contextlib
import dataclasses
import logging
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from tf_piggyback.core import methods
from tf_piggyback.core.layers import MASK_VARIABLE_SCALE
from tf_piggyback.core.surgery import freeze_backbone, masked_layers
from tf_piggyback.data.images import augment
from tf_piggyback.training.evaluation import sparsity_by_kernel

METHODS = methods.names()
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of one training run; defaults are the paper's (§4), bar the SGD methods'
    warm-up (`warmup_epochs`)."""

    method: str = "piggyback"
    epochs: int = 30
    batch_size: int = 32
    mask_lr: float = 1e-4
    head_lr: float = 1e-4
    finetune_lr: float = 1e-3
    # SGD's rate (finetune, packnet) rises linearly over this many epochs; 0: the paper's schedule
    # (methods.base.LinearWarmup; BUILD.md, "Training defaults").
    warmup_epochs: int = 5
    lora_lr: float = 1e-3  # Adam, the LoRA baseline's adapters
    lr_decay_epochs: int = 15
    lr_decay: float = 0.1
    seed: int = 0
    precision: str = "float32"
    jit_compile: bool = False

    def __post_init__(self):
        methods.get(self.method)  # one of METHODS, or a one-line ValueError
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}. Received: precision={self.precision!r}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be an integer > 0. Received: {name}={value!r}")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0. Received: warmup_epochs={self.warmup_epochs!r}")
        for name in ("mask_lr", "head_lr", "finetune_lr", "lora_lr", "lr_decay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0. Received: {name}={getattr(self, name)!r}")

    def check_strategy(self, strategy):
        """Raises a one-line ValueError for settings that `strategy` cannot run."""
        if self.jit_compile and strategy.num_replicas_in_sync > 1:
            # XLA cannot reach the other replicas' variables from strategy.run (Keras turns it
            # off under tf.distribute for the same reason).
            raise ValueError(f"jit_compile (XLA) needs a one-replica strategy; this one has "
                             f"{strategy.num_replicas_in_sync} replicas: drop --jit_compile or use --strategy=default")
        if self.precision == "mixed_float16" and strategy.num_replicas_in_sync > 1:
            # Keras' LossScaleOptimizer checks each replica's own gradients for inf/NaN before
            # they are summed, so one replica's overflow can reach the step; a NaN m_r then
            # thresholds to 0 while the loss stays finite.
            raise ValueError(f"mixed_float16 needs a one-replica strategy; this one has "
                             f"{strategy.num_replicas_in_sync} replicas (its loss scaling checks each replica's "
                             "gradients alone): use --precision=mixed_bfloat16 (no loss scaling) or --strategy=default")


SHUFFLE_BUFFER_BYTES = 256 * 2**20
MAX_SHUFFLE_BUFFER = 10_000


def epoch_batches(examples, batch_size, *, seed=0, shuffle=True, buffer_size=None, augment_images=False):
    """`epoch -> batched dataset`: a fixed shuffle per epoch, so a resumed run sees the same batches.

    Args:
        examples: an unbatched `tf.data.Dataset` of `(image, label)`, or `seed -> such a
            dataset` in a fresh order of that seed (`datasets.Splits.epoch`: every epoch then
            visits the images in an order of its own, not just within the shuffle window).
        batch_size: the global batch size.
        seed: with the epoch number, seeds that epoch's shuffle (and augmentation).
        buffer_size: the shuffle window, in images; default as many as fit in
            `SHUFFLE_BUFFER_BYTES` (at most 10,000): the window holds decoded float images, and
            10,000 of them at 224 px would take 6 GB. Folder datasets come in an order already
            mixed across classes (`datasets`), so a window of hundreds still gives batches
            with as many classes as a full shuffle.
        augment_images: apply `augment`, seeded by (seed, epoch, position in the epoch). (The
            paper protocol's crops come from `datasets.Splits.epoch`, cropped as decoded.)
    """
    if buffer_size is None:
        shapes = [spec.shape for spec in tf.nest.flatten((examples(0) if callable(examples) else examples).element_spec[0])]
        image_bytes = sum(4 * int(np.prod(shape)) for shape in shapes) if all(s.is_fully_defined() for s in shapes) else 1
        buffer_size = int(min(MAX_SHUFFLE_BUFFER, max(batch_size, SHUFFLE_BUFFER_BYTES // image_bytes)))

    def make(epoch):
        ds = examples(seed * 100_003 + epoch) if callable(examples) else examples
        if shuffle:
            ds = ds.shuffle(buffer_size, seed=seed * 100_003 + epoch, reshuffle_each_iteration=False)
        if augment_images:
            ds = ds.enumerate().map(
                lambda i, example: (augment(example[0], tf.stack([tf.constant(seed * 100_003 + epoch, tf.int64), i])),
                                    example[1]), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return ds.with_options(options)

    return make


def make_optimizers(model, config, steps_per_epoch):
    """`[(optimizer, variables), ...]`: one group per learning rate, as the method says
    (`Method.optimizers`; §4). Under `mixed_float16` each optimizer is wrapped in a
    `keras.optimizers.LossScaleOptimizer`."""
    groups = methods.get(config.method).optimizers(model, config, steps_per_epoch)
    if config.precision == "mixed_float16":
        groups = [(keras.optimizers.LossScaleOptimizer(optimizer), vs) for optimizer, vs in groups]
    return groups


@contextlib.contextmanager
def precision_policy(precision):
    """Keras' global dtype policy set to `precision` (see `PRECISIONS`) while models are built
    inside; float32 variables always, so task files do not depend on it."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def make_train_step(model, groups, strategy, jit_compile=None, gradient_masks=None):
    """A `tf.function` `(images, labels) -> [loss sum, correct, count, labels per class]` over all
    replicas (with per-pixel labels, each image counts once, its loss and accuracy averaged over
    its pixels; the labels per class count pixels).

    Args:
        model: the task model.
        groups: `make_optimizers`' `[(optimizer, variables), ...]`.
        strategy: the `tf.distribute.Strategy` the model was built under.
        jit_compile: passed to `tf.function` (XLA); None leaves TensorFlow's default.
        gradient_masks: optional `{id(variable): 0/1 mask}`; those variables' gradients are
            multiplied by their masks, so masked-out entries never change (PackNet).
    """
    variables = [v for _, vs in groups for v in vs]
    gradient_masks = gradient_masks or {}
    # Mixed float16: the loss is scaled by the first group's dynamic loss scale; the other groups'
    # gradients are rescaled to their own scale (powers of 2: exact), and each LossScaleOptimizer
    # unscales and skips its step when its gradients overflowed.
    scaler = groups[0][0] if isinstance(groups[0][0], keras.optimizers.LossScaleOptimizer) else None

    def step(images, labels):
        # Only what is trained is watched. Keras' frozen weights are still trainable
        # tf.Variables, which a default tape watches: it would record the frozen backbone's
        # layers too (all of them upstream of `mask_from`) and differentiate through them.
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([v.value for v in variables])
            logits = tf.cast(model(images, training=True), tf.float32)  # float16/bfloat16 under mixed precision
            per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            hits = tf.cast(tf.equal(tf.argmax(logits, -1), tf.cast(labels, tf.int64)), tf.float32)
            if per_example.shape.rank > 1:  # per-pixel labels (§6): each image's mean over its pixels
                axes = list(range(1, per_example.shape.rank))
                per_example, hits = tf.reduce_mean(per_example, axes), tf.reduce_mean(hits, axes)
            loss = tf.nn.compute_average_loss(per_example)
            if scaler is not None:
                loss = scaler.scale_loss(loss)
        grads = tape.gradient(loss, variables)
        grads = [g * gradient_masks[id(v)] if id(v) in gradient_masks else g for g, v in zip(grads, variables)]
        start = 0
        for optimizer, vs in groups:
            group_grads = grads[start:start + len(vs)]
            if scaler is not None and optimizer is not scaler:
                ratio = optimizer.dynamic_scale / scaler.dynamic_scale
                group_grads = [g * ratio for g in group_grads]
            optimizer.apply_gradients(zip(group_grads, vs))
            start += len(vs)
        # Each class's count of labels (pixels, for per-pixel labels): what a guess from the class
        # frequencies alone would score (`chance_levels`).
        classes = tf.reduce_sum(tf.reshape(tf.one_hot(labels, logits.shape[-1]), [-1, logits.shape[-1]]), 0)
        return tf.reduce_sum(per_example), tf.reduce_sum(hits), tf.cast(tf.shape(labels)[0], tf.float32), classes

    @tf.function(jit_compile=jit_compile)
    def distributed_step(images, labels):
        results = strategy.run(step, args=(images, labels))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, r, axis=None) for r in results]

    return distributed_step


def is_chief(strategy):
    """Whether this process writes the run's outputs (always, except non-chief multi-workers)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)


def train(model, dataset, config, *, strategy=None, steps_per_epoch=None, checkpoint_dir=None,
          summary_dir=None, log=print, verbose=0, gradient_masks=None):
    """Trains `model` for `config.epochs` epochs, resuming from `checkpoint_dir` if it holds one.

    Args:
        model: a task model (`piggyback`, `classifier_only` or `finetune`), created under
            `strategy.scope()` when a strategy is given.
        dataset: a `tf.data.Dataset` of global batches, or `epoch -> dataset` (see
            `epoch_batches`; needed for a resumed run to repeat an uninterrupted one exactly).
        config: a `TrainConfig`.
        strategy: a `tf.distribute.Strategy`; default the current (single-device) one.
        steps_per_epoch: batches per epoch, for the learning-rate decay; default the
            dataset's cardinality, counted in one pass where tf.data does not know it (image
            folders drop files that fail to decode, so their length is known only once read).
        checkpoint_dir: where a checkpoint is written after every epoch (model, optimizers,
            epoch); a rerun restores the latest one and goes on from there.
        summary_dir: where TensorBoard scalars go: loss, accuracy, learning rates, overall and
            per-layer mask sparsity.
        log: called with one line per epoch (and a `warning: ...` line after an epoch at chance).
        verbose: 1 shows a progress bar during each epoch; "auto" shows one when stdout is a
            terminal (Keras' `verbose=2`, one line per epoch, otherwise).
        gradient_masks: see `make_train_step`.

    Returns:
        A list with one dict per epoch trained in this call: `epoch`, `loss`, `accuracy`, `seconds`,
        and `warning` where an epoch after the first trained at chance level (`at_chance`: its
        accuracy that of answering the most frequent class, or its loss that of a guess from the
        class frequencies, ln C for C balanced classes).

    Raises:
        FloatingPointError: the loss of a step became NaN or inf; the run stops at that step,
            naming the learning-rate flags to lower, and the last finite checkpoint stays.
    """
    strategy = strategy or tf.distribute.get_strategy()
    config.check_strategy(strategy)
    make_dataset = dataset if callable(dataset) else (lambda epoch: dataset)
    if steps_per_epoch is None:
        first = make_dataset(0)
        steps_per_epoch = int(first.cardinality())
        if steps_per_epoch == tf.data.UNKNOWN_CARDINALITY:
            steps_per_epoch = int(first.reduce(0, lambda count, _: count + 1))
    if steps_per_epoch <= 0:
        raise ValueError("the training dataset is empty or of unknown size; give it a known, finite length")
    if getattr(model, "task_spec", None) is not None:
        unfrozen = freeze_backbone(model)
        if unfrozen:
            logging.warning("%d backbone layer(s) of %s had been set trainable; frozen again: a task trains only "
                            "its masks, head and per-task BatchNormalization", unfrozen, model.name)
    with strategy.scope():
        groups = make_optimizers(model, config, steps_per_epoch)
        for optimizer, vs in groups:
            optimizer.build(vs)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        # Marks the checkpoints whose masks are held as m_r * MASK_VARIABLE_SCALE; those written before
        # it hold m_r itself, and a resume from one rescales them (else every mask would read as off).
        mask_scale = tf.Variable(MASK_VARIABLE_SCALE, trainable=False, name="mask_variable_scale")
    objects = dict(model=model, epoch=epoch_var, **{f"optimizer{i}": opt for i, (opt, _) in enumerate(groups)})
    checkpoint = tf.train.Checkpoint(**objects, mask_variable_scale=mask_scale)
    manager = None
    if checkpoint_dir:
        if not is_chief(strategy):  # every worker saves; only the chief's copy is kept
            checkpoint_dir = os.path.join(checkpoint_dir, f"worker{strategy.cluster_resolver.task_id}")
        manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=2)
        if manager.latest_checkpoint:
            scaled = any(name.startswith("mask_variable_scale/")
                         for name, _ in tf.train.list_variables(manager.latest_checkpoint))
            (checkpoint if scaled else tf.train.Checkpoint(**objects)).restore(
                manager.latest_checkpoint).assert_existing_objects_matched()
            log(f"resumed from {manager.latest_checkpoint} after epoch {int(epoch_var.numpy())}")
            if not scaled:
                for mask in (m for layer in masked_layers(model) for m in layer.masks):
                    mask.assign(mask * MASK_VARIABLE_SCALE)
    writer = tf.summary.create_file_writer(summary_dir) if summary_dir and is_chief(strategy) else None

    distributed_step = make_train_step(model, groups, strategy, jit_compile=config.jit_compile or None,
                                       gradient_masks=gradient_masks)

    if verbose == "auto":  # a progress bar on a terminal; elsewhere (CI, nohup, notebooks) its redraws
        verbose = int(sys.stdout.isatty())  # would fill the log, and `log` gives one line per epoch anyway
    history = []
    for epoch in range(int(epoch_var.numpy()), config.epochs):
        start_time = time.time()
        totals, classes = np.zeros(3), 0.0
        progress = keras.utils.Progbar(steps_per_epoch, verbose=verbose)
        for step, (images, labels) in enumerate(strategy.experimental_distribute_dataset(make_dataset(epoch)), 1):
            *sums, counts = distributed_step(images, labels)
            sums = np.array([float(t) for t in sums])
            if not np.isfinite(sums[0]):  # at once: no later step recovers, and no checkpoint gets this state
                _diverged(f"loss became {sums[0] / sums[2]} in epoch {epoch + 1}, step {step}", config, manager)
            totals, classes = totals + sums, classes + counts.numpy()
            progress.add(1, values=[("loss", totals[0] / totals[2])])
        # The last step's own update is seen by no loss: its weights are checked before they are kept.
        broken = [v.path for _, vs in groups for v in vs if not np.all(np.isfinite(keras.ops.convert_to_numpy(v)))]
        if broken:
            _diverged(f"weights became NaN or inf in epoch {epoch + 1}'s last step ({', '.join(broken[:3])}"
                      + (", ..." if len(broken) > 3 else "") + ")", config, manager)
        loss, accuracy = totals[0] / totals[2], totals[1] / totals[2]
        epoch_var.assign(epoch + 1)
        if manager:
            manager.save(checkpoint_number=epoch + 1)
        history.append({"epoch": epoch + 1, "loss": loss, "accuracy": accuracy, "seconds": time.time() - start_time})
        if writer:
            _write_summaries(writer, model, groups, history[-1])
        log(f"epoch {epoch + 1}/{config.epochs}  loss {loss:.4f}  accuracy {accuracy:.4f}  "
            f"({history[-1]['seconds']:.1f}s)")
        chance_loss, chance_accuracy = chance_levels(classes)
        if epoch > 0 and at_chance(accuracy, chance_accuracy, [h["loss"] for h in history[-2:]], chance_loss):
            history[-1]["warning"] = (
                f"epoch {epoch + 1} trained at chance level: loss {loss:.4f}, accuracy {accuracy:.4f}; a guess from "
                f"the class frequencies scores {chance_loss:.4f} (ln {np.count_nonzero(classes)} = "
                f"{np.log(np.count_nonzero(classes)):.4f}) and {chance_accuracy:.4f}. Not a result: "
                f"{learning_rate_advice(config, 'check')}")
            log(f"warning: {history[-1]['warning']}")
    return history


def _diverged(what, config, manager):
    """Raises the one-line `FloatingPointError` of a diverged run: what became non-finite, the
    learning rates to lower, and the last finite checkpoint, which stays."""
    kept = manager and manager.latest_checkpoint
    raise FloatingPointError(f"{what}: the training diverged; {learning_rate_advice(config)} and train again in a "
                             f"new --model_dir" + (f"; the last finite checkpoint stays: {kept}" if kept else ""))


def at_chance(accuracy, chance_accuracy, losses=(), chance_loss=None):
    """Whether an epoch learned nothing (BUILD.md, "Training defaults"): its accuracy at most that
    of answering the most frequent class (a network with constant outputs scores at most that) plus
    1% of the errors that answer makes (0.8 points for 5 balanced classes; on data 97% of one
    class, 0.03 points: 97.8% is a result), or its loss sitting at a guess from the class
    frequencies, within 0.5% of `chance_loss` in this epoch and the one before (`losses`, oldest
    first): the issue's dead VGG16 sat at 2.3025 for ln 10 = 2.3026, while a loss falling from
    above passes it within one epoch."""
    return accuracy <= chance_accuracy + 0.01 * (1.0 - chance_accuracy) or (
        len(losses) == 2 and all(abs(loss - chance_loss) <= 0.005 * chance_loss for loss in losses))


def chance_levels(class_counts):
    """`(loss, accuracy)` of a guess from the class frequencies `p` alone: the cross-entropy
    `-sum p ln p` (ln C for C balanced classes) and the largest frequency."""
    p = np.asarray(class_counts, np.float64)
    p = p[p > 0] / p.sum()
    return float(-np.sum(p * np.log(p))), float(p.max())


def learning_rate_advice(config, verb="lower"):
    """"lower --finetune_lr (now 0.001)": the learning rates of `config.method`
    (`Method.learning_rates`), as the advice on a diverged run ("check" on a chance-level one: its
    network may have died, or its head learn too slowly on large features)."""
    names = methods.get(config.method).learning_rates
    return (f"{verb} {', '.join('--' + name for name in names)} (now "
            f"{', '.join(f'{getattr(config, name):g}' for name in names)})")


def _write_summaries(writer, model, groups, record):
    with writer.as_default(step=record["epoch"]):
        tf.summary.scalar("loss", record["loss"])
        tf.summary.scalar("accuracy", record["accuracy"])
        for i, (optimizer, _) in enumerate(groups):
            tf.summary.scalar(f"learning_rate/{i}", float(optimizer.learning_rate))
        if masked_layers(model):
            for path, sparsity in sparsity_by_kernel(model).items():
                tf.summary.scalar(f"sparsity/{path}", sparsity)
