"""What the library asks of a training method (`Method`), and the registry of methods by name."""

import keras
import numpy as np

from tf_piggyback.core.files import TaskFileError
from tf_piggyback.core.layers import MASK_VARIABLE_SCALE
from tf_piggyback.core.surgery import mask_sparsity, masked_layers, task_weights

_REGISTRY = {}
TASK_FILE = "task.npz"


def register(cls):
    """Class decorator: makes `cls()` the method named `cls.name` (for `--method`, task files,
    `get`)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"a method named {cls.name!r} is registered already")
    _REGISTRY[cls.name] = cls()
    return cls


def get(name):
    """The registered method named `name`; a one-line ValueError for another name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method must be one of {', '.join(_REGISTRY)}. Received: method={name!r}") from None


def names():
    """The registered methods' names, in registration order."""
    return tuple(_REGISTRY)


def schedule(lr, config, steps_per_epoch, warmup_epochs=0):
    """`lr`, times `config.lr_decay` after `config.lr_decay_epochs` epochs (§4: x0.1 after 15 of 30),
    rising linearly over the first `warmup_epochs` epochs (`LinearWarmup`) if > 0."""
    boundary = config.lr_decay_epochs * steps_per_epoch
    decay = keras.optimizers.schedules.PiecewiseConstantDecay([boundary], [lr, lr * config.lr_decay])
    return LinearWarmup(decay, warmup_epochs * steps_per_epoch) if warmup_epochs > 0 else decay


@keras.saving.register_keras_serializable(package="tf_piggyback")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule`'s rate times `(step + 1) / steps` for the first `steps` steps, then as it is
    (the linear warm-up of Goyal et al., 2017).

    Why the SGD methods warm up (BUILD.md, "Training defaults"): a new head over the large
    activations of a network without BatchNormalization (VGG16) starts with gradients large
    enough that SGD at the paper's 1e-3 kills every ReLU, or overflows, within the first epoch.
    """

    def __init__(self, schedule, steps):
        self.schedule, self.steps = schedule, int(steps)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        return self.schedule(step) * keras.ops.minimum(1.0, (step + 1.0) / self.steps)

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule), "steps": self.steps}

    @classmethod
    def from_config(cls, config):
        return cls(keras.optimizers.schedules.deserialize(config["schedule"]), config["steps"])


def warmup_epochs(config):
    """The epochs the SGD methods warm up over: `config.warmup_epochs`, at most a sixth of the run
    (the default 5 is a sixth of the paper's 30 epochs; a 5-epoch run warms up over 1, not all 5),
    at least 1; 0 stays 0 (the paper's schedule)."""
    return min(config.warmup_epochs, max(1, round(config.epochs / 6))) if config.warmup_epochs else 0


def momentum_sgd(model, config, steps_per_epoch):
    """One group: SGD with momentum 0.9 at `config.finetune_lr` over every trainable variable
    (§4: the finetuning baseline's optimizer; PackNet's too), warmed up over `warmup_epochs(config)`
    epochs (`LinearWarmup`; 0: the paper's schedule)."""
    return [(keras.optimizers.SGD(schedule(config.finetune_lr, config, steps_per_epoch, warmup_epochs(config)),
                                  momentum=0.9), list(model.trainable_variables))]


class Method:
    """One way to learn a task over a frozen backbone. `experiment.run`, `taskfile`, `TaskBank`,
    the trainer and `report` ask the method what to do, never test its name.

    A subclass sets `name` and implements `build`; the defaults below are those of a method
    whose task is masks and/or owned weights saved as a task file (piggyback, classifier-only).

    Attributes:
        name: what `--method=` and a task file's manifest call it.
        takes_head: whether it trains with another head than the default Dense one (`--head=fcn`,
            per-pixel labels).
        takes_mask_from: whether it learns from a layer on only (`--mask_from`).
        output: the file `experiment.run` writes into `model_dir`: `TASK_FILE` (`save_task`),
            or the method's own (`model.keras`, `packnet.npz`: `save`).
        storage: how `report` counts the storage of all tasks: "shared" (one backbone plus each
            task's file), "own" (each task a whole model), "pack" (one file holds every task).
        learning_rates: the `TrainConfig` fields (and `train.py` flags) of its learning rates,
            named when a run diverges or trains at chance level (`trainer.learning_rate_advice`).
    """

    name = None
    takes_head = True
    takes_mask_from = False
    output = TASK_FILE
    storage = "shared"
    learning_rates = ("mask_lr", "head_lr")

    def build(self, backbone, num_classes, config, head=None):
        """The untrained task model over `backbone` for a `RunConfig` `config` (and a `head` from
        `experiment.build_head`, None: the default Dense head)."""
        raise NotImplementedError

    def start(self, backbone, num_classes, config, head=None):
        """What `train` goes on from, made before a run claims its model_dir (so bad settings
        fail first): the task model (`build`), or PackNet's pack."""
        return self.build(backbone, num_classes, config, head)

    def train(self, started, config, fit, class_names):
        """Trains what `start` made; returns `(task model, history)`.

        `fit(model, train_config, phase, gradient_masks=None)` runs `trainer.train` (phase names
        the checkpoint and summary folders, "" for one phase) and returns its history."""
        return started, fit(started, config.train, "")

    def optimizers(self, model, config, steps_per_epoch):
        """`[(optimizer, variables), ...]`, one group per learning rate of the `TrainConfig`
        `config` (§4: Adam, `mask_lr` for the masks, `head_lr` for the rest). What the task owns,
        never "everything trainable": the backbone stays out whatever its layers' trainable
        flags say (`surgery.freeze_backbone`)."""
        masks = [m for layer in masked_layers(model) for m in layer.masks]
        others = [w for w in task_weights(model) if w.trainable]
        # The mask variables hold m_r * MASK_VARIABLE_SCALE: Adam at mask_lr times it moves m_r at mask_lr.
        return [(keras.optimizers.Adam(schedule(lr, config, steps_per_epoch)), variables)
                for lr, variables in ((config.mask_lr * MASK_VARIABLE_SCALE, masks), (config.head_lr, others))
                if variables]

    def summary(self, model):
        """What `metrics.json` records of the trained task: `sparsity` (of its masks) and
        `params` (what it stores besides the shared backbone: 1 bit per mask value and its own
        weights; for finetune, every weight)."""
        masks = [m for layer in masked_layers(model) for m in layer.thresholded_masks()]
        params = sum(m.size for m in masks) + sum(int(np.prod(w.shape)) for w in task_weights(model))
        return {"sparsity": mask_sparsity(masks), "params": int(params)}

    def save(self, model, path, *, class_names, metrics):
        """Writes a trained task whose `output` is not a task file (`experiment.run` writes task
        files with `taskfile.save_task`) to `path`, atomically."""
        raise NotImplementedError

    def load(self, backbone, manifest):
        """The task model, untrained, that a task file's `manifest` describes (its masks and own
        weights are then read in by `taskfile.load_task`)."""
        raise TaskFileError(f"{self.name} runs write {self.output}, not task files")

    def label(self, config):
        """The method's column in `report`'s tables, for a run's `config` (dict of `RunConfig`)."""
        return self.name

    def served_alone(self, manifest):
        """Why a task cannot share a `TaskBank`'s one traced backbone (None if it can)."""
        return None
