"""The saved module format (module/structure.json + weights.safetensors): tampered or damaged folders refused
in one line (exit 2) with nothing run, and effcompile's classes and functions registered (the round trips of
every pass are in test_module_round_trips.py)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import effcompile
from effcompile.cli.main import main

# ------------------------------------------------------------------------------ tampered folders

class Boom:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small compiled module (symbolic_trace, plain codegen) saved once; tests tamper with copies."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    folder = tmp_path_factory.mktemp("saved") / "out"
    return Path(effcompile.compile(model, (torch.randn(3, 4),), measure=False).save(str(folder)))


class Keywords(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return {"out": torch.relu(self.proj(x))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small module captured by torch.export (pytree codegen with keyword inputs) saved once."""
    folder = tmp_path_factory.mktemp("exported") / "out"
    result = effcompile.compile(Keywords(), {"x": torch.randn(3, 4)}, capture_path="export", measure=False)
    return Path(result.save(str(folder)))


def _copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(source, target)
    return target


def _edit_structure(folder: Path, edit) -> None:
    path = folder / "module" / "structure.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def _nodes(document, op=None):
    return [n for n in document["root"]["graph"]["nodes"] if op is None or n["op"] == op]


def _as_call(node, target, args):
    node.update(op="call_function", target=target, args=args, kwargs={})


def _marker_command(marker):
    return f"touch {marker}"


TAMPERS = {
    "node calls os.system": lambda d, m: _as_call(_nodes(d, "call_module")[0], "fn:os.system", [_marker_command(m)]),
    "node calls builtins.eval": lambda d, m: _as_call(
        _nodes(d, "call_module")[0], "fn:builtins.eval", [f"__import__('os').system('{_marker_command(m)}')"]),
    "node calls subprocess.run": lambda d, m: _as_call(
        _nodes(d, "call_module")[0], "fn:subprocess.run", [{"$": "tuple", "v": ["touch", m]}]),
    "node names an effcompile function that is not registered": lambda d, m: _as_call(
        _nodes(d, "call_module")[0], "effcompile:system", [_marker_command(m)]),
    "node names aten::from_file": lambda d, m: _as_call(_nodes(d, "call_module")[0], "op:aten::from_file.default", [m]),
    "argument is os.system": lambda d, m: _nodes(d, "call_module")[0].update(
        args=[{"$": "fn", "v": "fn:os.system"}, _marker_command(m)]),
    "module class os.system": lambda d, m: d["root"]["modules"]["0"].update({"class": "torch.nn:os.system"}),
    "module class subprocess.Popen": lambda d, m: d["root"]["modules"]["0"].update({"class": "subprocess.Popen"}),
    "module class builtins.eval": lambda d, m: d["root"]["modules"]["0"].update({"class": "effcompile:eval"}),
    "method __call__": lambda d, m: _nodes(d, "call_module")[0].update(op="call_method", target="__call__"),
    "method with code in its name": lambda d, m: _nodes(d, "call_module")[0].update(
        op="call_method", target=f"relu(); __import__('os').system('{_marker_command(m)}'); x.relu"),
    "getattr of a dunder": lambda d, m: _as_call(_nodes(d, "call_module")[0], "fn:builtins.getattr",
                                                 [{"$": "node", "v": _nodes(d, "placeholder")[0]["name"]}, "__class__"]),
    "get_attr of a dunder path": lambda d, m: _nodes(d, "call_module")[0].update(
        op="get_attr", target="__class__.__init__", args=[]),
    "get_attr with code in the path": lambda d, m: _nodes(d, "call_module")[0].update(
        op="get_attr", target=f'0"); __import__("os").system("{_marker_command(m)}"); ("', args=[]),
    "placeholder with code": lambda d, m: _nodes(d, "placeholder")[0].update(
        target=f"x=__import__('os').system('{_marker_command(m)}')"),
    "keyword with code": lambda d, m: _nodes(d, "call_module")[0].update(
        kwargs={f"a=__import__('os').system('{_marker_command(m)}')": 1}),
    "attribute named __class__": lambda d, m: d["root"]["modules"]["0"]["attributes"].update({"__class__": 1}),
    "attribute replacing forward": lambda d, m: d["root"]["modules"]["0"]["attributes"].update(
        forward={"$": "fn", "v": "fn:builtins.getattr"}),
    "attribute replacing _compiled_call_impl": lambda d, m: d["root"]["modules"]["0"]["attributes"].update(
        _compiled_call_impl={"$": "fn", "v": "effcompile:remat.call_module"}),
    "getattr of register_hook": lambda d, m: _as_call(
        _nodes(d, "call_module")[0], "fn:builtins.getattr",
        [{"$": "node", "v": _nodes(d, "placeholder")[0]["name"]}, "register_hook"]),
    "class name with code": lambda d, m: d["root"].update(class_name="X(): pass\nimport os"),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_tampered_structure_is_refused_and_runs_nothing(tamper, saved, tmp_path):
    folder = _copy(saved, tmp_path)
    marker = tmp_path / "ran"
    _edit_structure(folder, lambda document: TAMPERS[tamper](document, str(marker)))
    with pytest.raises(effcompile.OutputError) as raised:
        module = effcompile.load(str(folder))
        module(torch.randn(3, 4))  # reached only if loading accepted the folder
    assert "structure.json" in str(raised.value) and "\n" not in str(raised.value)
    assert not marker.exists()


PYTREE_TAMPERS = {
    "output type os.system": lambda spec, m: spec.replace("builtins.dict", "os.system"),
    "defaultdict calling os.system": lambda spec, m: spec.replace(
        '"type": "builtins.dict", "context": "[\\"out\\"]"',
        '"type": "collections.defaultdict", "context": ' + json.dumps(json.dumps(
            {"default_factory_module": "os", "default_factory_name": "system", "dict_context": ["out"]}))),
}


@pytest.mark.parametrize("tamper", list(PYTREE_TAMPERS))
def test_tampered_tree_spec_is_refused(tamper, exported, tmp_path):
    folder = _copy(exported, tmp_path)
    marker = tmp_path / "ran"

    def edit(document):
        codegen = document["root"]["graph"]["codegen"]
        assert codegen["kind"] == "pytree"
        changed = PYTREE_TAMPERS[tamper](codegen["out_spec"], str(marker))
        assert changed != codegen["out_spec"]
        codegen["out_spec"] = changed

    _edit_structure(folder, edit)
    with pytest.raises(effcompile.OutputError, match="nothing was run"):
        effcompile.load(str(folder))
    assert not marker.exists()


def test_input_keys_with_code_are_refused(exported, tmp_path):
    folder = _copy(exported, tmp_path)

    def edit(document):
        codegen = document["root"]["graph"]["codegen"]
        codegen["in_spec"] = codegen["in_spec"].replace('\\"x\\"', '\\"x\': __import__(\'os\'), \'y\\"')

    _edit_structure(folder, edit)
    with pytest.raises(effcompile.OutputError, match="plain keys"):
        effcompile.load(str(folder))


def test_exported_module_round_trips_its_keyword_inputs(exported):
    codegen = json.loads((exported / "module" / "structure.json").read_text())["root"]["graph"]["codegen"]
    assert codegen["kind"] == "pytree" and codegen["orig_args"] == ["x"]
    loaded = effcompile.load(str(exported))
    assert loaded(x=torch.randn(5, 4))["out"].shape == (5, 4)


def _write_pickle_structure(folder: Path, marker: Path) -> None:
    module_dir = folder / "module"
    (module_dir / "structure.json").unlink(missing_ok=True)
    (module_dir / "structure.pt").write_bytes(pickle.dumps(Boom(str(marker))))


def test_old_pickle_folder_is_refused_without_unpickling(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    marker = tmp_path / "ran"
    _write_pickle_structure(folder, marker)
    with pytest.raises(effcompile.OutputError, match=r"pickle \(structure.pt\).*effcompile MODEL --out DIR"):
        effcompile.load(str(folder))
    assert not marker.exists()


def test_train_on_a_tampered_folder_exits_2_and_runs_nothing(saved, tmp_path, capsys):
    folder = _copy(saved, tmp_path)
    marker = tmp_path / "ran"
    _edit_structure(folder, lambda d: TAMPERS["node calls os.system"](d, str(marker)))
    code = main(["train", str(folder), "--steps", "1", "--max-bytes", "20000", "--quiet"])
    assert code == 2 and "os.system" in capsys.readouterr().err
    assert not marker.exists()


def test_train_on_a_pickle_folder_in_a_new_process_exits_2_and_runs_nothing(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    marker = tmp_path / "ran"
    _write_pickle_structure(folder, marker)
    result = subprocess.run([sys.executable, "-m", "effcompile.cli.main", "train", str(folder), "--steps", "1",
                             "--max-bytes", "20000", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-400:]
    assert "structure.pt" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------ damaged folders

def _weights(folder: Path) -> Path:
    return folder / "module" / "weights.safetensors"


def _retype(folder: Path, dtype=None, shape=None, extra=False, drop=False) -> None:
    tensors = load_file(str(_weights(folder)))
    name = next(iter(tensors))
    if dtype is not None:
        tensors[name] = tensors[name].to(dtype)
    if shape is not None:
        tensors[name] = torch.zeros(shape)
    if extra:
        tensors["smuggled"] = torch.zeros(2)
    if drop:
        del tensors[name]
    save_file(tensors, str(_weights(folder)))


DAMAGE = {
    "float64 weight": (lambda f: _retype(f, dtype=torch.float64), "float64"),
    "wrong shape": (lambda f: _retype(f, shape=(7,)), "structure says"),
    "extra tensor": (lambda f: _retype(f, extra=True), "does not name"),
    "missing tensor": (lambda f: _retype(f, drop=True), "lacks"),
    "truncated weights": (lambda f: _weights(f).write_bytes(_weights(f).read_bytes()[:100]), "damaged or truncated"),
    "no weights": (lambda f: _weights(f).unlink(), "no weights.safetensors"),
    "truncated structure": (lambda f: (f / "module" / "structure.json").write_text(
        (f / "module" / "structure.json").read_text()[:200]), "is damaged"),
    "no structure": (lambda f: (f / "module" / "structure.json").unlink(), "no structure.json"),
    "future version": (lambda f: _edit_structure(f, lambda d: d.update(version=99)), "format version"),
    "no root": (lambda f: _edit_structure(f, lambda d: d.pop("root")), "expected an object"),
    "dangling node reference": (lambda f: _edit_structure(f, lambda d: _nodes(d, "call_module")[1].update(
        args=[{"$": "node", "v": "nowhere"}])), "malformed 'node'"),
    "unknown tensor name": (lambda f: _edit_structure(f, lambda d: d["root"]["modules"]["0"]["parameters"].update(
        weight="nowhere")), "lacks"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_folder_is_one_output_error(damage, saved, tmp_path, capsys):
    folder = _copy(saved, tmp_path)
    breaks, message = DAMAGE[damage]
    breaks(folder)
    with pytest.raises(effcompile.OutputError, match=message):
        effcompile.load(str(folder))
    if damage in ("truncated weights", "truncated structure"):
        code = main(["train", str(folder), "--steps", "1", "--max-bytes", "20000", "--quiet"])
        stderr = capsys.readouterr().err
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr


# ------------------------------------------------------------------------------ registration

def test_every_effcompile_module_class_is_registered():
    from effcompile.export.registry import import_pass_modules, registration_of

    classes = []
    for name in import_pass_modules():
        for value in vars(sys.modules[name]).values():
            if isinstance(value, type) and issubclass(value, torch.nn.Module) and value.__module__ == name:
                classes.append(value)
    assert classes, "no module classes found under effcompile.passes"
    assert [c.__qualname__ for c in classes if registration_of(c) is None] == []


def test_unregistered_effcompile_class_fails_at_save_with_the_fix(tmp_path):
    from effcompile.export.registry import RegistrationError, serializable

    unregistered = type("Forgotten", (torch.nn.Linear,), {"__module__": "effcompile.passes.forgotten"})
    graph_module = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    graph_module.extra = unregistered(2, 2)
    with pytest.raises(RegistrationError, match="serializable"):
        effcompile.export.module.save_module(graph_module, tmp_path / "a")

    holder = serializable(name="test_module_format.Holder")(
        type("Holder", (torch.nn.Module,), {"__module__": "effcompile.passes.holder"}))
    del graph_module.extra
    graph_module.holder = holder()
    graph_module.holder.cache = lambda: None  # a callable that is not data and not declared transient
    with pytest.raises(RegistrationError, match="transient"):
        effcompile.export.module.save_module(graph_module, tmp_path / "b")


def test_user_module_class_cannot_be_saved(tmp_path):
    class Mine(torch.nn.Module):
        def forward(self, x):
            return x

    graph_module = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    graph_module.mine = Mine()
    with pytest.raises(effcompile.OutputError, match="neither a torch.nn module nor an effcompile module"):
        effcompile.export.module.save_module(graph_module, tmp_path / "a")


def test_effcompile_custom_ops_are_allow_listed():
    from effcompile.export import allowlist
    from effcompile.passes.fuse import ops  # noqa: F401  (defines torch.ops.effcompile.*)

    for name in ("rms_norm", "rms_norm_backward", "gated_activation", "gated_activation_backward",
                 "linear_cross_entropy"):
        op = getattr(torch.ops.effcompile, name).default
        stored = allowlist.encode_target(op)
        assert stored == f"op:effcompile::{name}.default"
        assert allowlist.decode_target(stored, "node") is op
    with pytest.raises(effcompile.UnsafeFolderError, match="not an allow-listed"):
        allowlist.decode_target("op:effcompile::system.default", "node")


def test_module_marked_unsaveable_is_refused_with_its_reason(tmp_path):
    from effcompile.export.registry import UNSAVEABLE

    graph_module = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    setattr(graph_module.get_submodule("0"), UNSAVEABLE, "this module is special; save it without X")
    with pytest.raises(effcompile.OutputError, match="module 0 .*this module is special; save it without X"):
        effcompile.export.module.save_module(graph_module, tmp_path / "a")


def test_float8_linears_are_refused_at_save_with_the_fix(monkeypatch, tmp_path):
    """amp float8 needs a Hopper GPU and torchao; a stand-in torchao shows what the swap leaves for saving."""
    import types

    from effcompile.passes.amp.float8 import swap_float8_linears

    class Float8Linear(torch.nn.Linear):
        @classmethod
        def from_float(cls, shell, config):
            module = cls(shell.in_features, shell.out_features, bias=shell.bias is not None, device="meta")
            module.weight, module.bias = shell.weight, shell.bias
            return module

    Float8Linear.__module__ = "torchao.float8.float8_linear"
    float8 = types.ModuleType("torchao.float8")
    float8.Float8LinearConfig = types.SimpleNamespace(from_recipe_name=lambda recipe: recipe)
    float8_linear = types.ModuleType("torchao.float8.float8_linear")
    float8_linear.Float8Linear = Float8Linear
    for name, module in (("torchao", types.ModuleType("torchao")), ("torchao.float8", float8),
                         ("torchao.float8.float8_linear", float8_linear)):
        monkeypatch.setitem(sys.modules, name, module)
    model = torch.nn.Sequential(*(torch.nn.Linear(32, 32) for _ in range(3)))
    graph_module = torch.fx.symbolic_trace(model)
    decisions = swap_float8_linears(graph_module, "tensorwise", min_dim=16)
    assert [d.startswith("float8") for d in decisions.values()] == [False, True, False]
    with pytest.raises(effcompile.OutputError, match="amp dtype=float8 .*Float8Linear.*amp.dtype=float8"):
        effcompile.export.module.save_module(graph_module, tmp_path / "a")
    assert not (tmp_path / "a" / "structure.json").exists()


@pytest.mark.parametrize("described, expected", [
    ({"shape": [2, 3], "dtype": "int64"}, (2, 3)),
    ({"shape": [2, 3], "dtype": "save"}, None),  # a torch function, not a dtype: never called
    ({"shape": [2, -3], "dtype": "int64"}, None),
    ({"shape": ["2"], "dtype": "int64"}, None),
])
def test_report_example_inputs_are_read_as_data(tmp_path, described, expected):
    from effcompile.cli.train import compiled_example_inputs

    (tmp_path / "report.json").write_text(json.dumps({"model": {"example_inputs": {"args": [described],
                                                                                    "kwargs": {}}}}))
    inputs = compiled_example_inputs(str(tmp_path))
    assert (None if inputs is None else tuple(inputs[0].shape)) == expected
