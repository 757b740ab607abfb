"""The package's shape (issue 25): no import cycle inside vtfusion_jax/ (module-level and function-level imports
both count), no module imports another module's private names, and one training step: jax.value_and_grad of a loss
appears in train_lib.make_train_step only (benchmarks time that step, tasks only define losses)."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "vtfusion_jax")


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


def _imports(path: str, name: str, modules: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(imported package module, names imported from it) for every import statement in the file."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if submodules:
                found += [(m, []) for m in submodules]
            if base in modules:
                found.append((base, [n for n in names if f"{base}.{n}" not in modules]))
    return found


def test_no_import_cycle_and_no_private_imports():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = _imports(path, name, modules)
        graph[name] = {d for d, _ in deps if d != name and not name.startswith(d + ".")}  # a package's own parents
        private = [(d, n) for d, names in deps for n in names if n.startswith("_") and d != name]
        assert not private, f"{name} imports private names {private}"
    assert len(graph) > 1  # the walk saw the package
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, dep]))
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_one_train_step_in_the_code():
    hits = []
    for folder in ("vtfusion_jax", "benchmarks", "scripts"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for f in files:
                if f.endswith(".py") and "value_and_grad" in open(os.path.join(root, f)).read():
                    hits.append(os.path.relpath(os.path.join(root, f), REPO))
    assert hits == ["vtfusion_jax/train_lib.py"], hits


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """The walk really finds cycles: a two-module package importing each other fails it."""
    pkg = tmp_path / "vtfusion_jax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from vtfusion_jax import b\n")
    (pkg / "b.py").write_text("def f():\n    from vtfusion_jax import a\n")  # a function-level import counts
    monkeypatch.setattr(__import__(__name__), "PACKAGE", str(pkg))
    monkeypatch.setattr(__import__(__name__), "REPO", str(tmp_path))
    import pytest

    with pytest.raises(AssertionError, match="import cycle: vtfusion_jax.a -> vtfusion_jax.b -> vtfusion_jax.a"):
        test_no_import_cycle_and_no_private_imports()
    (pkg / "b.py").write_text("from vtfusion_jax.a import _x\n")
    (pkg / "a.py").write_text("_x = 1\n")
    with pytest.raises(AssertionError, match="vtfusion_jax.b imports private names"):
        test_no_import_cycle_and_no_private_imports()
