"""The package's shape (BUILD.md, "How the code is laid out"): imports go one way, no module imports
another's private names, no module grows past ~400 lines, benchmarks stay outside the package."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tf_piggyback"
# Each module may import only modules of the levels above its own (BUILD.md's picture).
LEVELS = [
    {"files", "coding", "binarizers", "fingerprint", "signatures", "images", "distribute"},
    {"layers", "sources"},
    {"datasets", "text"},
    {"backbones"},
    {"surgery"},
    {"evaluation"},
    {"methods.base"},
    {"methods.piggyback", "methods.classifier", "methods.finetune", "methods.lora", "methods.packnet"},
    {"methods"},
    {"taskfile"},
    {"trainer"},
    {"callbacks"},
    {"bankgraph", "tflite", "ondevice", "phonebytes"},
    {"bankstore", "phoneint8"},
    {"bankmodule"},
    {"taskbank", "phone"},
    {"export"},
    {"experiment", "report", "cli"},
]
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if name != "__init__":
            yield name.removesuffix(".__init__"), path


def _imports(path):
    """`(module, names)` for every `from tf_piggyback... import names` / `import tf_piggyback...`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tf_piggyback"):
            module = node.module.removeprefix("tf_piggyback").lstrip(".")
            for alias in node.names:  # `from tf_piggyback.methods import lora` imports a module
                submodule = f"{module}.{alias.name}".lstrip(".")
                yield (submodule, []) if submodule in LEVEL else (module, [alias.name])
        elif isinstance(node, ast.Import):
            yield from ((a.name.removeprefix("tf_piggyback."), []) for a in node.names if a.name.startswith("tf_piggyback."))


def test_every_module_has_a_level():
    assert {name for name, _ in _modules()} == set(LEVEL)


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_imports_go_one_way_and_never_to_private_names(name, path):
    for module, names in _imports(path):
        assert LEVEL[module] < LEVEL[name], f"{name} imports {module}, which is not above it"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{name} imports private names {private} from {module}"


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_no_module_grows_past_400_lines(name, path):
    lines = len(path.read_text().splitlines())
    assert lines <= 420, f"{name} has {lines} lines, past ~400: split it"


def test_benchmarks_live_outside_the_package():
    assert not list(PACKAGE.rglob("bench*.py"))
