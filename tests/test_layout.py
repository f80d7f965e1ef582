"""The package's shape: imports run one way (no cycles), the model is pure (torch, config, ops), and importing
mambakit changes nothing in the process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mambakit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported mambakit module, at module level?) for every import in the file, those under
    `if TYPE_CHECKING:` excluded (they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module, is_package = _module_name(path), path.name == "__init__.py"
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "mambakit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith("mambakit"):
                continue
            base = node.module if node.level == 0 else _resolve(module, is_package, node.level, node.module)
            # `from . import x` names a submodule x when one exists
            names = [f"{base}.{a.name}" if (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).with_suffix(".py")
                     .exists() or (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).is_dir() else base
                     for a in node.names]
        else:
            continue
        out += [(n, id(node) in top) for n in names]
    return out


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        deps = {m for m, top in _imports(path) if top or not module_level_only}
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}  # a package's own parents
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m not in graph:
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_has_no_cycles():
    """Counting every import, deferred ones inside functions too (a deferred import in a cycle is still a cycle
    of concepts)."""
    assert _cycle(_graph(module_level_only=False)) is None, _cycle(_graph(module_level_only=False))


def test_the_model_imports_only_torch_config_and_ops():
    # the model's files: model.py and the mixers and MLP it builds (mamba2.py, attention.py, mlp.py), themselves
    # torch + config + ops
    imported = {m for m, top in _imports(PACKAGE / "model.py") if top}
    assert imported == {"mambakit.ops", "mambakit.config", "mambakit.mamba2", "mambakit.attention",
                        "mambakit.mlp"}, imported
    assert {m for m, _ in _imports(PACKAGE / "mamba2.py")} == {"mambakit.ops", "mambakit.config"}
    assert {m for m, _ in _imports(PACKAGE / "attention.py")} == {"mambakit.ops", "mambakit.config"}
    assert {m for m, _ in _imports(PACKAGE / "mlp.py")} == set()
    # its deferred imports: the checkpoint reader behind MambaLM.from_pretrained / save_pretrained, which builds
    # the model through the class it is given, and the Hub resolver; neither imports model.py
    deferred = {m for m, top in _imports(PACKAGE / "model.py") if not top}
    assert deferred == {"mambakit.checkpoint", "mambakit.hub"}, deferred
    assert not any(m.startswith("mambakit.model") for m, _ in _imports(PACKAGE / "checkpoint.py"))
    assert not any(m.startswith("mambakit.model") for m, top in _imports(PACKAGE / "hub.py") if top)
    for name in ("model.py", "mamba2.py", "attention.py", "mlp.py"):
        tree = ast.parse((PACKAGE / name).read_text(encoding="utf-8"))
        third_party = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        third_party |= {n.module.split(".")[0] for n in ast.walk(tree)
                        if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert third_party <= {"torch", "math", "dataclasses", "typing", "__future__"}, (name, third_party)


def test_nothing_but_the_apps_and_the_cli_imports_the_engine():
    """The engine is applied from outside: the model, ops and checkpoints never import it."""
    for name, deps in _graph(module_level_only=False).items():
        if any(d.startswith("mambakit.engine") for d in deps):
            assert name.split(".")[1] in ("engine", "generate", "serve", "train", "cli"), name


def test_importing_mambakit_changes_nothing_in_the_process():
    code = """
import os, sys, threading
env, threads = dict(os.environ), threading.active_count()
import mambakit
from mambakit import MambaConfig, MambaLM, generate, ops
import mambakit.engine, mambakit.serve.engine, mambakit.train, mambakit.eval, mambakit.cli
assert dict(os.environ) == env, {k: v for k, v in os.environ.items() if env.get(k) != v}
assert threading.active_count() == threads
model = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=32))
ptrs = [p.data_ptr() for p in model.parameters()]
out = generate(model, [[1, 2]], 3, temperature=0)
assert [p.data_ptr() for p in model.parameters()] == ptrs, "generate moved the parameters"
assert dict(os.environ) == env
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
