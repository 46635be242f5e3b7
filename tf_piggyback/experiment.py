"""One training run, end to end: backbone + dataset + method -> trained task on disk.

This is what `scripts/train.py` and the demo call; everything it writes goes to `model_dir`:
`task.npz` (piggyback, classifier) or `model.keras` (finetune), `metrics.json`, `config.json`.
"""

import dataclasses
import functools
import json
import os

import keras
import numpy as np
import tensorflow as tf

from tf_piggyback.backbones import load_backbone
from tf_piggyback.binarizers import DEFAULT_THRESHOLD
from tf_piggyback.datasets import DEFAULT_CACHE_MB, SPLIT_SEED, load_dataset
from tf_piggyback.layers import DEFAULT_MASK_SCALE
from tf_piggyback.packnet import DEFAULT_PRUNE, PackNet
from tf_piggyback.surgery import (classifier_only, fcn_head, feature_model, finetune, lora, mask_sparsity,
                                  masked_layers, piggyback)
from tf_piggyback.taskfile import save_task, task_weights, write_atomic
from tf_piggyback.trainer import TrainConfig, epoch_batches, is_chief, precision_policy, test_metrics, train


@dataclasses.dataclass
class RunConfig:
    """Everything one run depends on; written to `model_dir/config.json`."""

    backbone: str = "digits"
    weights: str = "imagenet"
    image_size: int = None
    dataset: str = "digits:upper"
    threshold: float = DEFAULT_THRESHOLD
    mask_init: str = "constant"
    mask_scale: float = DEFAULT_MASK_SCALE
    mask_type: str = "binary"
    train_bn: bool = False
    feature_layer: str = None
    skip_unsupported: bool = False
    # Learn masks only from this layer on (surgery.piggyback): a faster step, less activation memory.
    mask_from: str = None
    mask_embeddings: bool = True  # mask Embedding tables too (surgery.piggyback)
    lora_rank: int = 4  # --method=lora: the adapters' rank
    head: str = "auto"  # one of HEADS: "dense", or "fcn" for per-pixel labels (§6); "auto" picks by the labels
    prune: float = DEFAULT_PRUNE
    packnet_base: str = ""
    augment: bool = False
    # "simple" or "paper": the paper's data handling (datasets.load_dataset); "paper" crops
    # training images with trainer.random_sized_crop, so it needs no --augment.
    protocol: str = "simple"
    cache: bool = True
    cache_mb: int = DEFAULT_CACHE_MB
    # The held-out split's seed (folder: datasets without train/ and test/), never the training
    # seed: evaluate.py and train_on_device.py hold out the same images (datasets.load_dataset).
    split_seed: int = SPLIT_SEED
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


PACKNET_FILE = "packnet.npz"
HEADS = ("auto", "dense", "fcn")


def retrain_epochs(epochs):
    """PackNet's retraining after pruning: half the epochs (at least 1), at a tenth of the lr."""
    return max(1, epochs // 2)


def _pack(config, backbone):
    if not config.packnet_base:
        return PackNet(backbone, config.prune, feature_layer=config.feature_layer)
    path = os.path.join(config.packnet_base, PACKNET_FILE)
    if not os.path.exists(path):
        raise ValueError(f"--packnet_base={config.packnet_base} holds no {PACKNET_FILE}; "
                         "pass the --model_dir of a finished PackNet run")
    return PackNet.load(path, backbone)


def build_head(config, backbone, num_classes, dense=False):
    """The head `config.head` names (None: the default Dense head); `dense`: the labels are
    per-pixel maps, which need per-pixel logits (`fcn_head`, upsampled to the input's size)."""
    head = config.head if config.head != "auto" else ("fcn" if dense else "dense")
    if dense != (head == "fcn"):
        raise ValueError(f"--head={head} does not fit {config.dataset}: per-pixel labels need --head=fcn "
                         "(per-pixel logits), one label per image needs --head=dense")
    if head == "dense":
        return None
    if config.train.method not in ("piggyback", "classifier", "finetune"):
        raise ValueError(f"--head=fcn trains with --method=piggyback, classifier or finetune. "
                         f"Received: method={config.train.method!r}")
    shape, size = feature_model(backbone, config.feature_layer).output_shape, backbone.input_shape[1:3]
    if len(shape) != 4 or size[0] % shape[1] or size[1] % shape[2] or size[0] // shape[1] != size[1] // shape[2]:
        raise ValueError(f"--head=fcn needs a spatial feature map whose size divides the input's {tuple(size)}; "
                         f"the features are {tuple(shape[1:])}: name one with --feature_layer (e.g. relu3 of the "
                         "digits backbone)")
    return fcn_head(num_classes, size[0] // shape[1])


def build_model(config, backbone, num_classes, dense=False):
    """The task model for `config.train.method` over `backbone` (`dense`: per-pixel labels)."""
    method = config.train.method
    if config.mask_from and method != "piggyback":
        raise ValueError(f"--mask_from applies to --method=piggyback only. Received: method={method!r}")
    head = build_head(config, backbone, num_classes, dense)
    if method == "piggyback":
        return piggyback(backbone, num_classes, threshold=config.threshold, mask_init=config.mask_init,
                         mask_scale=config.mask_scale, mask_type=config.mask_type, train_bn=config.train_bn,
                         feature_layer=config.feature_layer, skip_unsupported=config.skip_unsupported,
                         mask_from=config.mask_from, head=head, mask_embeddings=config.mask_embeddings)
    if method == "classifier":
        return classifier_only(backbone, num_classes, feature_layer=config.feature_layer, head=head)
    if method == "lora":
        return lora(backbone, num_classes, rank=config.lora_rank, feature_layer=config.feature_layer)
    return finetune(backbone, num_classes, feature_layer=config.feature_layer, head=head)


def _stored_params(model, masks):
    """Parameters the task stores besides the shared backbone: masks (1 bit each) and its own
    weights — the head, per-task BatchNormalization, or for finetune the whole network."""
    return int(sum(m.size for m in masks) + sum(int(np.prod(w.shape)) for w in task_weights(model)))


def _check_same_run(config, model_dir):
    """A model_dir holds one run: resuming it with other settings (bar epochs) is refused.
    Settings that a run's config.json predates count as their defaults."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        written = json.load(f)
    defaults = json.loads(RunConfig().to_json())
    previous = {**defaults, **written, "train": {**defaults["train"], **written.get("train", {})}}
    current = json.loads(config.to_json())
    previous.get("train", {}).pop("epochs", None)
    current["train"].pop("epochs")
    if previous != current:
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        raise ValueError(
            f"{model_dir} holds a run with other settings ({', '.join(changed)} differ); "
            "rerun with the same flags to resume, or use a new --model_dir"
        )


def input_pipeline(config, image_shape):
    """`(splits, epoch -> batches)`: the training input as `run` builds it (also what
    `scripts/bench.py --preset=pipeline` measures, with no model)."""
    if config.augment and config.protocol == "paper":
        raise ValueError("--protocol=paper takes its own random-sized crops and flips (trainer.random_sized_crop); "
                         "leave --augment off")
    splits = load_dataset(config.dataset, image_shape=image_shape, split_seed=config.split_seed,
                          cache_bytes=config.cache_mb * 2**20 if config.cache else 0, protocol=config.protocol)
    if config.augment and splits.dense:
        raise ValueError(f"--augment crops and flips the images only; {config.dataset}'s per-pixel labels would "
                         "not follow: leave it off")
    return splits, epoch_batches(splits.epoch, config.train.batch_size, seed=config.train.seed,
                                 augment_images=config.augment,
                                 crop_to=tuple(image_shape) if config.protocol == "paper" else None)


def run(config, model_dir, *, strategy=None, log=print, verbose=0):
    """Trains one task as `config` says and writes it to `model_dir`; returns the metrics dict.

    Rerunning the same call after a crash resumes from `model_dir/checkpoints`. Under a
    multi-worker strategy every worker trains and only the chief writes the outputs.
    PackNet adds the task to the pack in `config.packnet_base` (a previous PackNet run's
    model_dir; empty: a new pack on the backbone) and writes the grown pack to `packnet.npz`.
    """
    strategy = strategy or tf.distribute.get_strategy()
    config.train.check_strategy(strategy)
    _check_same_run(config, model_dir)
    with precision_policy(config.train.precision):
        return _run(config, model_dir, strategy, log, verbose)


def _run(config, model_dir, strategy, log, verbose):
    chief = is_chief(strategy)
    with strategy.scope():
        backbone = load_backbone(config.backbone, config.weights, config.image_size)
        splits, batches = input_pipeline(config, backbone.inputs[0].shape[1:])
        keras.utils.set_random_seed(config.train.seed)
        if splits.dense and config.train.method == "packnet":
            raise ValueError("per-pixel labels train with --method=piggyback, classifier or finetune")
        pack = _pack(config, backbone) if config.train.method == "packnet" else None
        model = build_model(config, backbone, len(splits.class_names), splits.dense) if pack is None else None
    if chief:  # only once the inputs are known good: a failed start must not claim the model_dir
        os.makedirs(model_dir, exist_ok=True)
        write_atomic(os.path.join(model_dir, "config.json"), lambda f: f.write(config.to_json().encode()))
    fit = functools.partial(train, dataset=batches, strategy=strategy, log=log, verbose=verbose,
                            steps_per_epoch=-(-splits.train_size // config.train.batch_size))
    if pack is None:
        history = fit(model, config=config.train, checkpoint_dir=os.path.join(model_dir, "checkpoints"),
                      summary_dir=os.path.join(model_dir, "logs"))
    else:
        history = []

        def fit_phase(task_model, phase):
            train_config = config.train if phase == "train" else dataclasses.replace(
                config.train, epochs=retrain_epochs(config.train.epochs), finetune_lr=config.train.finetune_lr * 0.1)
            history.extend(fit(task_model, config=train_config, gradient_masks=pack.gradient_masks(),
                               checkpoint_dir=os.path.join(model_dir, "checkpoints", phase),
                               summary_dir=os.path.join(model_dir, "logs", phase)))

        with strategy.scope():
            model = pack.task_model(pack.add_task(fit_phase, len(splits.class_names), splits.class_names))
    scores = test_metrics(model, splits)
    if pack is None:
        masks = [m for layer in masked_layers(model) for m in layer.thresholded_masks()]
        sparsity, params = mask_sparsity(masks), _stored_params(model, masks)
    else:  # PackNet: the room left for later tasks, and the one network all tasks share
        sparsity, params = pack.free_fraction(), int(sum(k.size for k in pack.owners))
    metrics = {
        "method": config.train.method,
        "dataset": config.dataset,
        "split_seed": config.split_seed,
        **scores,
        "protocol": config.protocol,
        "train_accuracy": history[-1]["accuracy"] if history else None,
        "sparsity": sparsity,
        "params": params,
        "train_seconds": float(sum(h["seconds"] for h in history)),
    }
    if pack is not None:
        metrics["task_index"] = len(pack.tasks)
        pack.tasks[-1]["metrics"] = {k: metrics[k] for k in ("accuracy", "top1_error")}
    if not chief:
        return metrics
    if pack is not None:
        path = os.path.join(model_dir, PACKNET_FILE)
        pack.save(path)
    elif config.train.method == "finetune":
        path = os.path.join(model_dir, "model.keras")
        tmp = os.path.join(model_dir, ".model.tmp.keras")
        model.save(tmp)
        os.replace(tmp, path)
    else:
        path = os.path.join(model_dir, "task.npz")
        # Only what the masks and head determine goes into the task file: reruns give the same bytes.
        save_task(model, path, class_names=splits.class_names,
                  metrics={k: metrics[k] for k in ("dataset", "split_seed", "protocol", *scores, "sparsity")})
    metrics["task_bytes"] = os.path.getsize(path)
    metrics["config"] = dataclasses.asdict(config)
    write_atomic(os.path.join(model_dir, "metrics.json"), lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    return metrics
