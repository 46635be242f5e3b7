"""How well a task does: top-k accuracy, per-pixel scores (§6), the test metrics runs and task
files record, and the masks' sparsity per kernel (Fig. 3).

Reference: Table 2 (top-1 error, top-5 in parentheses), §6 (segmentation), Fig. 3 (sparsity by layer).
"""

import numpy as np
import tensorflow as tf

from tf_piggyback.core.surgery import mask_sparsity, masked_layers


def sparsity_by_kernel(model):
    """`{kernel path: sparsity}` of each masked kernel of `model` and `"overall"`: what TensorBoard
    shows of a run's masks (Fig. 3), from `trainer.train` and the `MaskSparsity` callback."""
    pairs = [(kernel.path, mask) for layer in masked_layers(model)
             for kernel, mask in zip(layer.kernels, layer.thresholded_masks())]
    return {**{path: mask_sparsity([mask]) for path, mask in pairs}, "overall": mask_sparsity([m for _, m in pairs])}


def evaluate(model, data, labels=None, batch_size=256):
    """Top-1 accuracy of `model` in inference mode, on NumPy `(data, labels)` or on an unbatched
    `tf.data.Dataset` of `(image, label)`."""
    return accuracies(model, data, labels, batch_size)[1]


def accuracies(model, data, labels=None, batch_size=256, ks=(1, 5)):
    """`{k: top-k accuracy}` in one pass (Table 2 reports top-1 and, in parentheses, top-5 error)."""
    return _accuracies(model, data, labels, batch_size, ks)[0]


def _accuracies(model, data, labels, batch_size, ks):
    """`accuracies`, and the accuracy of always answering the most frequent label."""
    if labels is not None:
        data = tf.data.Dataset.from_tensor_slices((data, labels))
    correct, total, counts = dict.fromkeys(ks, 0), 0, {}
    for images, y in data.batch(batch_size):
        # A direct call, not predict(): Keras' predict splits batches across a distributed
        # model's replicas and returns each worker's copy under MultiWorkerMirroredStrategy.
        logits = np.asarray(model(images, training=False))
        ranked = np.argsort(-logits, axis=-1, kind="stable")
        for k in ks:
            correct[k] += int(np.sum(np.any(ranked[:, :k] == y.numpy()[:, None], axis=-1)))
        for label, count in zip(*np.unique(y.numpy(), return_counts=True)):
            counts[label] = counts.get(label, 0) + int(count)
        total += len(logits)
    if not total:
        raise ValueError("the evaluation set is empty")
    return {k: correct[k] / total for k in ks}, max(counts.values()) / total


def segmentation_scores(model, data, num_classes, batch_size=64):
    """Pixel accuracy and mean intersection-over-union (§6) on an unbatched dataset of
    `(image, label map)`; classes absent from both labels and predictions are left out of the mean."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for images, labels in data.batch(batch_size):
        predicted = np.argmax(np.asarray(model(images, training=False)), axis=-1)
        pairs = labels.numpy().ravel() * num_classes + predicted.ravel()
        confusion += np.bincount(pairs, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    if not confusion.sum():
        raise ValueError("the evaluation set is empty")
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    iou = np.diag(confusion)[union > 0] / union[union > 0]
    return {"pixel_accuracy": float(np.trace(confusion) / confusion.sum()), "miou": float(iou.mean()),
            "chance_accuracy": float(confusion.sum(1).max() / confusion.sum())}


def test_metrics(model, splits, batch_size=256):
    """What runs, `evaluate.py` and task files report on `splits.test`: `accuracy`,
    `top1_error`, `top5_error` (tasks of more than 5 classes) and, for per-pixel labels, `miou`
    (the accuracy is then the pixel accuracy); and `chance_accuracy`, that of always answering
    the test set's most frequent class (pixel class), against which a run is judged (`experiment.run`)."""
    if splits.dense:
        scores = segmentation_scores(model, splits.test, len(splits.class_names), batch_size)
        return {"accuracy": scores["pixel_accuracy"], "top1_error": 1.0 - scores["pixel_accuracy"],
                "top5_error": None, "miou": scores["miou"], "chance_accuracy": scores["chance_accuracy"]}
    top, chance = _accuracies(model, splits.test, None, batch_size, (1, 5))
    return {"accuracy": top[1], "top1_error": 1.0 - top[1],
            "top5_error": 1.0 - top[5] if len(splits.class_names) > 5 else None, "chance_accuracy": chance}
