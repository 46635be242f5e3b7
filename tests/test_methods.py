"""The method interface: every part of the library asks the method, so a new method is one class."""

import dataclasses

import keras
import pytest

import tf_piggyback as pb
from tf_piggyback.core import methods
from tf_piggyback.core.methods import base
from tf_piggyback.training import evaluation, trainer
from tf_piggyback.training.experiment import RunConfig, run
from tf_piggyback.training.report import collect, comparison


@pytest.fixture
def registry(monkeypatch):
    """Registrations made in a test stay in that test."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


def test_every_method_is_registered_in_order():
    assert methods.names() == ("piggyback", "classifier", "finetune", "packnet", "lora")
    assert pb.TrainConfig.__dataclass_fields__["method"].default in methods.names()
    with pytest.raises(ValueError, match="method must be one of piggyback, classifier, finetune, packnet, lora. "
                                         "Received: method='nope'"):
        pb.TrainConfig(method="nope")


def test_every_method_names_the_learning_rates_it_trains_with():
    """What a diverged or chance-level run tells the user to lower (issue 33): TrainConfig fields,
    which are train.py's flags of the same names."""
    fields = set(pb.TrainConfig.__dataclass_fields__)
    for name in methods.names():
        assert set(methods.get(name).learning_rates) <= fields, name
    assert trainer.learning_rate_advice(pb.TrainConfig(method="finetune")) == "lower --finetune_lr (now 0.001)"
    assert trainer.learning_rate_advice(pb.TrainConfig(method="lora", head_lr=1e-3)) == \
        "lower --lora_lr, --head_lr (now 0.001, 0.001)"


def test_a_new_method_is_one_class_and_its_registration(registry, tmp_path):
    """A probe with a two-layer MLP head: trained by `experiment.run`, saved as a task file that
    `load_task` rebuilds through the method, reported under the method's label, with no other
    file edited."""

    def mlp(num_classes):
        return keras.Sequential([keras.layers.Dense(32, activation="relu", name="mlp_hidden"),
                                 keras.layers.Dense(num_classes, name="mlp_out")], name="mlp")

    @methods.register
    class MlpProbe(methods.Method):
        name = "mlp_probe"

        def build(self, backbone, num_classes, config, head=None):
            model = pb.classifier_only(backbone, num_classes, head=mlp(num_classes))
            model.task_spec = dataclasses.replace(model.task_spec, method=self.name)
            return model

        def load(self, backbone, manifest):
            return self.build(backbone, manifest["num_classes"], RunConfig())

        def label(self, config):
            return "MLP probe"

    config = RunConfig(dataset="digits:upper", train=pb.TrainConfig(method="mlp_probe", epochs=1, head_lr=1e-3))
    metrics = run(config, str(tmp_path / "run"), log=lambda line: None)
    assert metrics["method"] == "mlp_probe" and metrics["params"] == 128 * 32 + 32 + 32 * 5 + 5
    manifest = pb.read_manifest(tmp_path / "run" / "task.npz")
    assert manifest["method"] == "mlp_probe"
    model = pb.load_task(str(tmp_path / "run" / "task.npz"), pb.digits_backbone())
    assert model.get_layer("mlp").get_layer("mlp_hidden").kernel.shape == (128, 32)
    # the reloaded task answers as the trained one did: the test accuracy run() recorded
    assert evaluation.test_metrics(model, pb.load_dataset("digits:upper"))["accuracy"] == pytest.approx(metrics["accuracy"])
    rows = collect([str(tmp_path / "run")])
    assert rows[0]["method"] == "MLP probe" and "| task | MLP probe |" in comparison(rows, backbone_bytes=400_000)
