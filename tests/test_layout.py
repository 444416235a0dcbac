"""The package layout: one installed import name, imports pointing one way, nothing on a user's path shadows us.

The allowed import directions are the table of docs/architecture.md (`ALLOWED` below); the test walks every
module's imports with `ast`, function-level imports included, so a lazy import is held to the same rule.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject.toml's package-dir mapping).
SOURCES = {
    "densepred": "densepred",
    "backbones": "densepred.backbones",
    "necks": "densepred.necks",
    "heads": "densepred.heads",
}
ENTRY_POINTS = ("train", "evaluate", "predict", "export")
# What each part of densepred may import from densepred (besides itself). Keep in step with docs/architecture.md.
ALLOWED = {
    "utils": set(),
    "layers": {"utils"},
    "backbones": {"utils"},
    "necks": {"layers", "utils"},
    "heads": {"layers", "necks", "utils"},  # necks: the deformable attention (MSDeformAttn) of the DETR decoders
    "data": {"utils"},
    "evaluation": {"data", "utils"},
    "export_format": {"utils"},
    "visualization": {"data", "utils"},
    "segmenter": {"backbones", "necks", "heads", "layers", "utils"},
    "convert": {"backbones", "segmenter", "export_format", "utils"},
    "engine": {
        "backbones",
        "necks",
        "heads",
        "layers",
        "data",
        "evaluation",
        "segmenter",
        "visualization",
        "export_format",
        "utils",
    },
    "deploy": {"engine", "heads", "necks", "segmenter", "utils"},
}


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    modules = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of the modules `path` imports, at any depth of the file (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(name, path):
            # The deepest module of ours that the import names (`from x import y` may name an attribute).
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_part_of_the_package_is_in_the_table():
    parts = {_part(m) for m in _modules()} - {""}
    assert parts <= set(ALLOWED), f"add {sorted(parts - set(ALLOWED))} to ALLOWED and to docs/architecture.md"


def test_imports_point_one_way():
    wrong = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if _part(module) and _part(target) != _part(module) and _part(target) not in ALLOWED[_part(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_bottom_layers_import_nothing_above_them():
    graph = _graph()
    for module, targets in graph.items():
        if _part(module) == "backbones":
            assert not {_part(t) for t in targets} & {"necks", "heads", "engine", "data", "segmenter"}, module
        if _part(module) == "heads":  # of the necks, only the deformable attention the DETR decoders share
            assert {t for t in targets if _part(t) == "necks"} <= {"densepred.necks.ms_deform_attn"}, module


def test_no_import_cycle_between_modules():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_nothing_imports_the_entry_points():
    for path in [*_modules().values(), *(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            assert not set(names) & set(ENTRY_POINTS), f"{path} imports an entry point: {names}"


def _shadow(folder: Path, names: tuple[str, ...], module_file: str | None = None) -> Path:
    """A folder of a user's project whose generic names would shadow ours if we installed them: each one
    raises when imported."""
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('the user folder {name}/ was imported')\n")
    if module_file:
        (folder / f"{module_file}.py").write_text(f"raise ImportError('the user file {module_file}.py was imported')\n")
    return folder


@pytest.mark.slow
def test_a_user_folder_with_generic_names_changes_nothing(tmp_path):
    """The entry points' own imports, run from a folder holding data/, heads/, evaluation/, ... and model.py,
    with a model/ package on PYTHONPATH too (the notebook case: the working directory comes first)."""
    project = _shadow(tmp_path / "project", ("data", "heads", "evaluation", "backbones", "necks"), "model")
    extra = _shadow(tmp_path / "extra", ("model", "data"))
    imports = []
    for script in ("train", "evaluate", "predict", "export"):
        tree = ast.parse((ROOT / f"{script}.py").read_text())
        imports += [
            ast.unparse(node)
            for node in tree.body
            if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", None) != "__future__"
        ]
    code = "\n".join([*imports, "import densepred.data, densepred.heads, densepred.evaluation, densepred.engine.build"])
    env = {**os.environ, "PYTHONPATH": str(extra)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # The check bites: the same folders do shadow a generic name.
    shadowed = subprocess.run([sys.executable, "-c", "import data"], cwd=project, capture_output=True, text=True)
    assert "the user folder data/ was imported" in shadowed.stderr


@pytest.mark.slow
def test_the_wheel_installs_only_densepred(tmp_path):
    """Built from a clean copy of the sources (a build/ folder of the checkout could hold stale modules)."""
    source = tmp_path / "src"
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "outputs", "*.egg-info", "__pycache__")
    )
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    result = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("densepred-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["densepred"]
    assert {n.split("/")[0] for n in names} == {"densepred", wheel.name.split("-py")[0] + ".dist-info"}
    # The design-card folders, the configs and the converter's COCO panoptic categories are inside the one package.
    members = ("backbones/base.py", "necks/fpn.py", "heads/criterion.py", "configs/criterion/mask2former.yaml")
    for member in (*members, "convert/coco_panoptic_categories.json"):
        assert f"densepred/{member}" in names


def test_the_installed_distribution_declares_only_densepred():
    from importlib.metadata import distribution

    dist = distribution("densepred")
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        assert top_level.split() == ["densepred"]
    packages = {p.split(".")[0] for p in _modules()}
    assert packages == {"densepred"}
