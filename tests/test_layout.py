"""The package's import rules (docs/design.md), read from the source with `ast`, and inference without training code.

Rules: no import cycles between modules (function-local imports count: a cycle they hide is still
a cycle); diffusion/ imports only torch, numpy, minidiffusion.errors and itself; learner/ never
imports nn, diffusion, data, metrics, pipelines or recipes; pipelines/ and metrics/ never import
learner or recipes; recipes are imported only by the command line; nothing imports cli; serve/ (the
web page) is imported only by the command line (its modules import each other) and never imports
learner or recipes; torch.distributed appears only in learner/distributed.py.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import minidiffusion

PACKAGE = Path(minidiffusion.__file__).parent


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(root: Path, name: str) -> bool:
    return (root.parent / Path(*name.split(".")) / "__init__.py").is_file()


def _exists(root: Path, name: str) -> bool:
    p = root.parent / Path(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports_of(root: Path) -> dict[str, set[str]]:
    """Return {module: the modules it imports (ours by full name, others by top-level name)}, every import."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        name = _module_name(root, path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{mod}.{alias.name}"
                    found.add(sub if mod.startswith(root.name) and _exists(root, sub) else mod)
        graph[name] = {m for m in found if m}
    return graph


def _ours(root: Path, name: str) -> bool:
    return name == root.name or name.startswith(root.name + ".")


def _in(name: str, root: str, *subs: str) -> bool:
    return any(name == f"{root}.{s}" or name.startswith(f"{root}.{s}.") for s in subs)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layout_violations(root: Path) -> list[str]:
    """Return one line per broken import rule in the package at `root` (empty: all rules hold)."""
    graph, pkg = imports_of(root), root.name
    # a package's __init__ that imports its own submodules is how packages work, not a cycle
    edges = {m: {d for d in deps if _ours(root, d) and not (_is_package(root, m) and d.startswith(m + "."))}
             for m, deps in graph.items()}
    problems = [f"import cycle: {' -> '.join(c)}" for c in _cycles(edges)]
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            ours = _ours(root, dep)
            if _in(mod, pkg, "diffusion"):
                allowed = _in(dep, pkg, "diffusion", "errors") if ours else (
                    dep.split(".")[0] in ("torch", "numpy") or dep.split(".")[0] in sys.stdlib_module_names)
                if not allowed:
                    problems.append(f"{mod} imports {dep}: diffusion/ imports only torch, numpy and errors")
            if _in(mod, pkg, "learner") and ours and _in(dep, pkg, "nn", "diffusion", "data", "metrics",
                                                         "pipelines", "recipes"):
                problems.append(f"{mod} imports {dep}: learner/ never imports nn, diffusion, data, metrics, "
                                "pipelines or recipes")
            if _in(mod, pkg, "pipelines", "metrics") and ours and _in(dep, pkg, "learner", "recipes"):
                problems.append(f"{mod} imports {dep}: pipelines/ and metrics/ never import learner or recipes")
            if ours and _in(dep, pkg, "recipes") and not (_in(mod, pkg, "recipes") or mod == f"{pkg}.cli"):
                problems.append(f"{mod} imports {dep}: recipes are imported only by the command line")
            if ours and dep in (f"{pkg}.cli", f"{pkg}.__main__") and mod != f"{pkg}.__main__":
                problems.append(f"{mod} imports {dep}: nothing imports cli")
            if ours and _in(dep, pkg, "serve") and not (_in(mod, pkg, "serve") or mod == f"{pkg}.cli"):
                problems.append(f"{mod} imports {dep}: serve/ is imported only by the command line")
            if _in(mod, pkg, "serve") and ours and _in(dep, pkg, "learner", "recipes"):
                problems.append(f"{mod} imports {dep}: serve/ never imports learner or recipes")
            if dep.startswith("torch.distributed") and mod != f"{pkg}.learner.distributed":
                problems.append(f"{mod} imports {dep}: torch.distributed belongs in learner/distributed.py only")
    return problems


def test_the_package_follows_its_import_rules():
    assert layout_violations(PACKAGE) == []


def test_the_rules_have_modules_to_check():
    graph = imports_of(PACKAGE)
    for sub in ("diffusion.samplers", "learner.learner", "pipelines.image", "metrics.features", "recipes.diffusion",
                "cli"):
        assert f"minidiffusion.{sub}" in graph
    assert "minidiffusion.learner.callbacks" in graph["minidiffusion.learner.learner"]  # relative imports resolve


@pytest.mark.parametrize("module,line,rule", [
    ("pipelines/image.py", "from ..recipes.diffusion import DiffusionConfig", "pipelines/ and metrics/ never"),
    ("metrics/features.py", "from ..learner.checkpoint import load_weights", "pipelines/ and metrics/ never"),
    ("diffusion/samplers.py", "from ..nn.unet import UNet", "diffusion/ imports only"),
    ("diffusion/schedules.py", "import scipy", "diffusion/ imports only"),
    ("learner/ema.py", "from ..nn import unet", "learner/ never imports"),
    ("data/images.py", "from ..recipes import train", "only by the command line"),
    ("nn/unet.py", "from ..cli import main", "nothing imports cli"),
    ("pipelines/image.py", "from ..serve.kinds import Kind", "serve/ is imported only by the command line"),
    ("serve/kinds.py", "from ..learner.learner import Learner", "serve/ never imports learner"),
    ("serve/server.py", "from ..recipes.diffusion import train", "serve/ never imports learner or recipes"),
    ("nn/layers.py", "import torch.distributed as dist", "torch.distributed"),
    ("learner/callback.py", "from .learner import Learner", "import cycle"),
])
def test_a_forbidden_import_is_caught(tmp_path, module, line, rule):
    copy = tmp_path / "minidiffusion"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    target = copy / module
    target.write_text(target.read_text() + f"\n\ndef _added():\n    {line}\n")  # even inside a function
    problems = layout_violations(copy)
    assert any(rule in p for p in problems), problems


def test_inference_loads_no_training_code():
    code = """
import sys
import minidiffusion.pipelines as p
m = p.DiffusionModel.from_pretrained("fmnist")
x, _ = m.sample(2, steps=2, seed=0)
assert x.shape == (2, 1, 32, 32)
from minidiffusion.metrics.features import load_feature_network
load_feature_network()
bad = sorted(k for k in sys.modules if k.startswith(("minidiffusion.learner", "minidiffusion.recipes")))
print(bad)
assert not bad, bad
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_public_api_resolves_lazily():
    names = [n for n in minidiffusion.__all__ if n != "__version__"]
    code = ("import sys, minidiffusion\n"
            "assert not any(k.startswith('minidiffusion.') for k in sys.modules), sorted(sys.modules)\n"
            f"for n in {names!r}: getattr(minidiffusion, n)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        minidiffusion.nope  # noqa: B018
