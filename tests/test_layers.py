"""Imports only go down: every `lorahub_cli` module, read with `ast`, imports nothing from a higher layer.

The layers (docs/architecture.md), lowest first; a module may import its own layer and those below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lorahub_cli

PACKAGE = Path(lorahub_cli.__file__).parent

LAYERS = [
    ["lorahub_cli", "errors", "settings", "io", "outputs", "quiet"],
    ["hub", "models", "registry", "cards"],
    ["retrieval", "routing", "compose", "spectral", "generation", "decoding", "publish", "retriever", "examples"],
    ["eval.tasks", "eval.scoring"],
    ["eval", "serve.engine", "serve.batcher"],
    ["demo", "scale"],
    ["api"],
    ["cli", "serve", "__main__", "demo.__main__"],
]
ENTRY_POINTS = ("cli", "serve.server", "__main__", "demo.__main__")  # may import Typer / the CLI


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts) or "lorahub_cli"


def layer(name: str) -> int:
    """The layer of the longest listed prefix of `name` (a dotted path inside the package)."""
    best, rank = -1, None
    for index, members in enumerate(LAYERS):
        for member in members:
            if (name == member or name.startswith(member + ".")) and len(member) > best:
                best, rank = len(member), index
    assert rank is not None, f"module '{name}' is in no layer: add it to LAYERS and docs/architecture.md"
    return rank


def imports(path: Path, name: str | None = None) -> list[tuple[int, str]]:
    """(line, module inside lorahub_cli) for every import of the package by module `name`, lazy ones included."""
    name = name or module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "lorahub_cli":
        package = []
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                targets = [".".join(base + ([node.module] if node.module else []))]
                if not node.module:  # from .. import x, y: each may be a module
                    targets = [".".join(base + [alias.name]) for alias in node.names]
            elif node.module and node.module.startswith("lorahub_cli"):
                targets = [node.module.removeprefix("lorahub_cli").lstrip(".")]
            else:
                continue
            found += [(node.lineno, t or "lorahub_cli") for t in targets]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name.removeprefix("lorahub_cli").lstrip(".") or "lorahub_cli")
                for a in node.names
                if a.name.startswith("lorahub_cli")
            ]
    return found


def known(name: str) -> str:
    """`name`, or the longest prefix of it that is a module (for `from ..x import function`)."""
    while name != "lorahub_cli" and not (
        (PACKAGE / name.replace(".", "/")).with_suffix(".py").is_file()
        or (PACKAGE / name.replace(".", "/") / "__init__.py").is_file()
    ):
        name = name.rpartition(".")[0] or "lorahub_cli"
    return name


def test_no_import_goes_up_a_layer():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for line, target in imports(path):
            target = known(target)
            if layer(target) > layer(importer):
                wrong.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {importer} (layer {layer(importer)}) "
                    f"imports {target} (layer {layer(target)})"
                )
    assert not wrong, "\n".join(wrong)


def test_no_library_module_imports_typer_or_rich():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if any(name == e or name.startswith(e + ".") for e in ENTRY_POINTS):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            )
            wrong += [
                f"{name}:{node.lineno} imports {m}" for m in modules if m.split(".")[0] in ("typer", "click", "rich")
            ]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The test above must be able to fail: a lazy import of the CLI from compose is caught."""
    assert layer("compose.pipeline") < layer("cli.compose")
    source = PACKAGE / "compose" / "pipeline.py"
    found = [t for _, t in imports(source)]
    assert "compose.recipe" in found and "registry.store" in found
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..cli import app\n")
    assert [known(t) for _, t in imports(probe, "compose.probe")] == ["cli"]
    assert layer("cli") > layer("compose.probe")
