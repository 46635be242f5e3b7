"""The package's shape (BUILD.md, "Layout"): five wings by concern, imports run one way (down the
wings, and within a wing down its levels), no module imports another's private names, no module
grows past ~400 lines nor a class past 200, benchmarks stay outside the package, and the paths
before the wings still import, with a DeprecationWarning, for one release."""

import ast
import importlib
import pathlib
import sys
import warnings

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tf_piggyback"
# The wings in order, each a list of levels: a module may import modules of an earlier wing, or of
# an earlier level of its own wing (BUILD.md's picture). The drivers' helpers sit on top.
WINGS = {
    "core": [{"files", "coding", "binarizers", "fingerprint"}, {"layers"}, {"surgery"}, {"methods.base"},
             {"methods.piggyback", "methods.classifier", "methods.finetune", "methods.lora", "methods.packnet"},
             {"methods"}, {"taskfile"}],
    "data": [{"images"}, {"sources"}, {"datasets", "text"}],
    "training": [{"distribute", "backbones", "evaluation"}, {"trainer"}, {"callbacks"}, {"experiment", "report"}],
    "serving": [{"signatures", "packing"}, {"slots", "store"}, {"graph", "versions"}, {"reader"}, {"taskbank"},
                {"saved_model"}],
    "devices": [{"tflite", "phonebytes", "ondevice"}, {"phoneint8"}, {"phone"}],
    "": [{"cli", "deprecated"}],
}
LEVELS = [{f"{wing}.{name}".lstrip(".") for name in names} for wing, levels in WINGS.items() for names in levels]
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}
WING = {name: i for i, (wing, levels) in enumerate(WINGS.items()) for names in levels
        for name in (f"{wing}.{n}".lstrip(".") for n in names)}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        if name != "__init__" and name not in WINGS:  # a wing's __init__ is its docstring
            yield name, path


def _imports(path):
    """`(module, names)` for every `from tf_piggyback... import names` / `import tf_piggyback...`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tf_piggyback"):
            module = node.module.removeprefix("tf_piggyback").lstrip(".")
            for alias in node.names:  # `from tf_piggyback.core.methods import lora` imports a module
                submodule = f"{module}.{alias.name}".lstrip(".")
                yield (submodule, []) if submodule in LEVEL else (module, [alias.name])
        elif isinstance(node, ast.Import):
            yield from ((a.name.removeprefix("tf_piggyback."), []) for a in node.names if a.name.startswith("tf_piggyback."))


def test_every_module_has_a_wing_and_a_level():
    assert {name for name, _ in _modules()} == set(LEVEL)


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_imports_go_one_way_and_never_to_private_names(name, path):
    for module, names in _imports(path):
        assert WING[module] <= WING[name], f"{name} imports {module}, of a later wing"
        assert LEVEL[module] < LEVEL[name], f"{name} imports {module}, which is not above it"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{name} imports private names {private} from {module}"


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_no_module_grows_past_400_lines(name, path):
    lines = len(path.read_text().splitlines())
    assert lines <= 420, f"{name} has {lines} lines, past ~400: split it"


def test_benchmarks_live_outside_the_package():
    assert not list(PACKAGE.rglob("bench*.py"))


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_no_class_grows_past_200_lines(name, path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            lines = node.end_lineno - node.lineno + 1
            assert lines <= 200, f"{name}.{node.name} has {lines} lines: it is several concepts, split it"


def _fresh_import(name):
    """Imports `name` anew (as a user's first import would), recording its warnings."""
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[loaded]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    return module, [w for w in caught if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("old", sorted(importlib.import_module("tf_piggyback.deprecated").MOVED))
def test_old_paths_import_with_a_deprecation_warning(old):
    from tf_piggyback.deprecated import MOVED

    module, caught = _fresh_import(f"tf_piggyback.{old}")
    home = importlib.import_module(f"tf_piggyback.{MOVED[old][0]}")
    # (`methods.lora` warns for `methods` first, if no earlier test imported it)
    assert str(caught[-1].message).split(";")[0] == f"tf_piggyback.{old} moved to {home.__name__}"
    assert all(w.filename == __file__ for w in caught)  # it names the importing line, not importlib's
    public = [n for n in vars(home) if not n.startswith("__")]
    assert public and all(getattr(module, n) is getattr(home, n) for n in public)


def test_old_paths_as_users_wrote_them():
    """`from ... import` forms of the flat layout, including the names `export` gave from TFLite."""
    from tf_piggyback.devices.tflite import export_tflite
    from tf_piggyback.serving.saved_model import export_saved_model

    namespace = {}
    export, caught = _fresh_import("tf_piggyback.export")
    assert "tf_piggyback.export moved to tf_piggyback.serving.saved_model" in str(caught[0].message)
    assert {"export_saved_model", "export_tflite", "representative_images"} <= set(export.__all__)  # `import *`
    exec("from tf_piggyback.export import export_saved_model, export_tflite\n"
         "from tf_piggyback.methods import lora\n"
         "from tf_piggyback.methods.packnet import PackNet\n"
         "import tf_piggyback.phone as phone", namespace)
    assert namespace["export_saved_model"] is export_saved_model and namespace["export_tflite"] is export_tflite
    assert namespace["lora"].lora is importlib.import_module("tf_piggyback").lora  # the module, or its shim
    assert namespace["PackNet"] is importlib.import_module("tf_piggyback").PackNet
    assert namespace["phone"].PhoneTasks is importlib.import_module("tf_piggyback.devices.phone").PhoneTasks
    pb = importlib.import_module("tf_piggyback")
    sys.modules.pop("tf_piggyback.trainer", None)  # as if no earlier test had imported it
    vars(pb).pop("trainer", None)
    with pytest.warns(DeprecationWarning, match="tf_piggyback.trainer moved to tf_piggyback.training.trainer"):
        assert pb.trainer.epoch_batches is pb.training.trainer.epoch_batches  # a module as the package's attribute
    _fresh_import("tf_piggyback.fingerprint")  # the old module of the same name as a public function
    assert pb.fingerprint is importlib.import_module("tf_piggyback.core.fingerprint").fingerprint
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        pb.no_such_name  # noqa: B018
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("tf_piggyback.no_such_module")



def test_the_public_api_is_as_before_the_wings():
    """`import tf_piggyback as pb` gives the 31 names it gave, none of them a module."""
    pb = importlib.import_module("tf_piggyback")
    assert len(pb.__all__) == 31 and all(not isinstance(getattr(pb, n), type(pb)) for n in pb.__all__)
