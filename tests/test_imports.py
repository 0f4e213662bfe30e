"""What two modules share is public: no module imports (or reaches through an imported module for) a private
`_name` of another project module. Read from the source with `ast`, so nothing is imported."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root is the `dynamicid` package
SKIP = {".venv", "build", "dist", "node_modules", ".git"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if SKIP & set(parts) or any(p.endswith(".egg-info") for p in parts):
            continue
        dotted = ["dynamicid", *parts[:-1]] + ([] if path.name == "__init__.py" else [path.stem])
        modules[".".join(dotted)] = path
    return modules


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(module: str, path: Path, known: set[str]) -> list[str]:
    """`from dynamicid.x import _y`, and `m._y` where `m` is a project module bound by an import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found, bound = [], {}
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dynamicid":
            for alias in node.names:
                if is_private(alias.name) and node.module != module:
                    found.append(f"{where}:{node.lineno} imports {node.module}.{alias.name}")
                if f"{node.module}.{alias.name}" in known:
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known and alias.asname:
                    bound[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and is_private(node.attr)
            and bound[node.value.id] != module
        ):
            found.append(f"{where}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_name():
    modules = project_modules()
    assert "dynamicid.infer.generate" in modules and "dynamicid.tests.test_imports" in modules  # the walk sees all
    found = [use for name, path in modules.items() for use in private_uses(name, path, set(modules))]
    assert found == [], "\n".join(found)


def test_the_check_sees_both_kinds_of_private_use(tmp_path):
    """The oracle: a FAKE module with one private import and one private attribute use is reported twice."""
    fake = tmp_path / "fake.py"
    fake.write_text(
        "from dynamicid.infer.cli import _hidden\nfrom dynamicid.infer import cli as c\nc._other()\n"
        "from dynamicid.infer.cli import main\n",
        encoding="utf-8",
    )
    known = {"dynamicid.infer.cli", "dynamicid.infer"}
    found = private_uses("dynamicid.fake", fake, known)
    assert [line.split(" ", 1)[1] for line in found] == [
        "imports dynamicid.infer.cli._hidden",
        "uses dynamicid.infer.cli._other",
    ]
