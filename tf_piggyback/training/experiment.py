"""One training run, end to end: backbone + dataset + method -> trained task on disk.

This is what `scripts/train.py` and the demo call; everything it writes goes to `model_dir`:
the method's output (`task.npz`, a task file; `model.keras` for finetune; `packnet.npz`: see
`Method.output`), `metrics.json`, `config.json`.
"""

import dataclasses
import json
import os

import keras
import tensorflow as tf

from tf_piggyback.core import methods
from tf_piggyback.core.binarizers import DEFAULT_THRESHOLD
from tf_piggyback.core.files import write_atomic
from tf_piggyback.core.layers import DEFAULT_MASK_SCALE
from tf_piggyback.core.methods.packnet import DEFAULT_PRUNE
from tf_piggyback.core.surgery import fcn_head, feature_model
from tf_piggyback.core.taskfile import save_task
from tf_piggyback.data.datasets import DEFAULT_CACHE_MB, SPLIT_SEED, load_dataset
from tf_piggyback.data.text import is_preset, load_preset, text_splits
from tf_piggyback.training.backbones import load_backbone
from tf_piggyback.training.evaluation import test_metrics
from tf_piggyback.training.trainer import TrainConfig, at_chance, epoch_batches, is_chief, learning_rate_advice, \
    precision_policy, train


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
    # Learn masks only from this layer on (methods.piggyback): a faster step, less activation memory.
    mask_from: str = None
    mask_embeddings: bool = True  # mask Embedding tables too (methods.piggyback)
    lora_rank: int = 4  # --method=lora: the adapters' rank
    head: str = "auto"  # one of HEADS: "dense", or "fcn" for per-pixel labels (§6); "auto" picks by the labels
    prune: float = DEFAULT_PRUNE
    packnet_base: str = ""
    augment: bool = False
    # "simple" or "paper": the paper's data handling (datasets.load_dataset); "paper" crops
    # training images with images.random_sized_crop, so it needs no --augment.
    protocol: str = "simple"
    cache: bool = True
    cache_mb: int = DEFAULT_CACHE_MB
    # The held-out split's seed (folder: datasets without train/ and test/), never the training
    # seed: evaluate.py and train_on_device.py hold out the same images (datasets.load_dataset).
    split_seed: int = SPLIT_SEED
    # A text preset's tokens per example (default: its preprocessor's; `text.load_preset`).
    sequence_length: int = None
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


HEADS = ("auto", "dense", "fcn")


def build_head(config, backbone, num_classes, dense=False):
    """The head `config.head` names (None: the default Dense head); `dense`: the labels are
    per-pixel maps, which need per-pixel logits (`fcn_head`, upsampled to the input's size)."""
    head = config.head if config.head != "auto" else ("fcn" if dense else "dense")
    if dense != (head == "fcn"):
        raise ValueError(f"--head={head} does not fit {config.dataset}: per-pixel labels need --head=fcn "
                         "(per-pixel logits), one label per image needs --head=dense")
    if head == "dense":
        return None
    if not methods.get(config.train.method).takes_head:
        raise ValueError(f"--head=fcn trains with --method={_head_methods()}. Received: method={config.train.method!r}")
    shape, size = feature_model(backbone, config.feature_layer).output_shape, backbone.input_shape[1:3]
    if len(shape) != 4 or size[0] % shape[1] or size[1] % shape[2] or size[0] // shape[1] != size[1] // shape[2]:
        raise ValueError(f"--head=fcn needs a spatial feature map whose size divides the input's {tuple(size)}; "
                         f"the features are {tuple(shape[1:])}: name one with --feature_layer (e.g. relu3 of the "
                         "digits backbone)")
    return fcn_head(num_classes, size[0] // shape[1])


def _head_methods():
    """The methods that train with another head (`Method.takes_head`), as "piggyback, classifier or finetune"."""
    names = [name for name in methods.names() if methods.get(name).takes_head]
    return ", ".join(names[:-1]) + " or " + names[-1]


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


def input_pipeline(config, image_shape, preprocessor=None):
    """`(splits, epoch -> batches)`: the training input as `run` builds it (also what
    `scripts/bench.py --preset=pipeline` measures, with no model). With a text preset's
    `preprocessor`, `image_shape` is the backbone's dict of inputs and the dataset is text
    (`text.text_splits`)."""
    if preprocessor is not None:
        if config.augment or config.protocol != "simple":
            raise ValueError("--augment and --protocol=paper crop images; a text dataset takes neither")
        splits = text_splits(config.dataset, preprocessor, list(image_shape), config.split_seed)
        return splits, epoch_batches(splits.epoch, config.train.batch_size, seed=config.train.seed)
    if config.augment and config.protocol == "paper":
        raise ValueError("--protocol=paper takes its own random-sized crops and flips (images.random_sized_crop); "
                         "leave --augment off")
    splits = load_dataset(config.dataset, image_shape=image_shape, split_seed=config.split_seed,
                          cache_bytes=config.cache_mb * 2**20 if config.cache else 0, protocol=config.protocol)
    if config.augment and splits.dense:
        raise ValueError(f"--augment crops and flips the images only; {config.dataset}'s per-pixel labels would "
                         "not follow: leave it off")
    return splits, epoch_batches(splits.epoch, config.train.batch_size, seed=config.train.seed,
                                 augment_images=config.augment)


def run_warnings(history, scores, train_config):
    """Why a trained run is no result, one line each (BUILD.md, "Training defaults"): its last epoch
    at chance level (`trainer.train`'s `warning`; an earlier one that the run recovered from is no
    mark: the tables show the trained result), a test accuracy at chance (`trainer.at_chance`
    against always answering the test set's most frequent class). `report` marks a run with any
    in every table."""
    stuck = [h for h in history if h.get("warning")]
    warnings = [f"{stuck[-1]['warning']} ({len(stuck)} of {len(history)} epochs at chance)"] \
        if history and history[-1].get("warning") else []
    if at_chance(scores["accuracy"], scores["chance_accuracy"]):
        warnings.append(f"test accuracy {scores['accuracy']:.4f} is at chance level ({scores['chance_accuracy']:.4f} "
                        f"always answering the most frequent class). Not a result: {learning_rate_advice(train_config, 'check')}")
    return warnings


def backbone_and_preprocessor(config):
    """`(backbone, preprocessor)` of a run: a text preset's preprocessor tokenizes its dataset
    (`text.load_preset`); any other backbone has none (`backbones.load_backbone`)."""
    if is_preset(config.backbone):
        backbone, preprocessor = load_preset(config.backbone, config.sequence_length)
        return backbone, preprocessor
    if config.sequence_length is not None:
        raise ValueError(f"--sequence_length applies to a keras-hub text preset. Received: --backbone={config.backbone}")
    backbone = load_backbone(config.backbone, config.weights, config.image_size)
    if isinstance(backbone.input, dict):
        raise ValueError(f"{config.backbone} takes {', '.join(backbone.input)}: train.py tokenizes a text dataset with "
                         "a keras-hub preset's preprocessor; pass --backbone=PRESET (a folder save_to_preset wrote)")
    return backbone, None


def run(config, model_dir, *, strategy=None, log=print, verbose=0):
    """Trains one task as `config` says and writes it to `model_dir`; returns the metrics dict.

    A run whose loss becomes NaN or inf stops with a `FloatingPointError` and writes no task; one
    that trains at chance level (`trainer.train`) is written, with `warnings` in its metrics.

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
    chief, method = is_chief(strategy), methods.get(config.train.method)
    with strategy.scope():
        backbone, preprocessor = backbone_and_preprocessor(config)
        splits, batches = input_pipeline(config, backbone.input if preprocessor else backbone.inputs[0].shape[1:],
                                         preprocessor)
        keras.utils.set_random_seed(config.train.seed)
        if config.mask_from and not method.takes_mask_from:
            takes = "|".join(name for name in methods.names() if methods.get(name).takes_mask_from)
            raise ValueError(f"--mask_from applies to --method={takes} only. Received: method={method.name!r}")
        if splits.dense and not method.takes_head:
            raise ValueError(f"per-pixel labels train with --method={_head_methods()}")
        started = method.start(backbone, len(splits.class_names), config,
                               build_head(config, backbone, len(splits.class_names), splits.dense))
    if chief:  # only once the inputs are known good: a failed start must not claim the model_dir
        os.makedirs(model_dir, exist_ok=True)
        write_atomic(os.path.join(model_dir, "config.json"), lambda f: f.write(config.to_json().encode()))
    steps_per_epoch = -(-splits.train_size // config.train.batch_size)

    def fit(model, train_config, phase, gradient_masks=None):
        return train(model, batches, train_config, strategy=strategy, log=log, verbose=verbose,
                     steps_per_epoch=steps_per_epoch, gradient_masks=gradient_masks,
                     checkpoint_dir=os.path.join(model_dir, "checkpoints", phase),
                     summary_dir=os.path.join(model_dir, "logs", phase))

    with strategy.scope():
        model, history = method.train(started, config, fit, splits.class_names)
    scores = test_metrics(model, splits)
    metrics = {
        "method": method.name,
        "dataset": config.dataset,
        "split_seed": config.split_seed,
        **scores,
        "protocol": config.protocol,
        "train_accuracy": history[-1]["accuracy"] if history else None,
        "train_seconds": float(sum(h["seconds"] for h in history)),
        **method.summary(model),
        "warnings": run_warnings(history, scores, config.train),
    }
    if not chief:
        return metrics
    path = os.path.join(model_dir, method.output)
    # Only what the masks and head determine goes into the task file: reruns give the same bytes.
    recorded = {k: metrics[k] for k in ("dataset", "split_seed", "protocol", *scores, "sparsity")
                if k != "chance_accuracy"}
    if preprocessor is not None:  # what evaluate.py tokenizes the test texts at
        recorded["sequence_length"] = int(preprocessor.sequence_length)
    if method.output == methods.TASK_FILE:
        save_task(model, path, class_names=splits.class_names, metrics=recorded)
    else:
        method.save(model, path, class_names=splits.class_names, metrics=recorded)
    metrics["task_bytes"] = os.path.getsize(path)
    metrics["config"] = dataclasses.asdict(config)
    write_atomic(os.path.join(model_dir, "metrics.json"), lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    return metrics
