"""The package layout is the architecture: each sub-package imports only what its docstring says
(the table below repeats those "May import" lines), so nothing reaches back up into the API, the
CLI or the hub from beneath them."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gptq_cli"
# sub-package -> the parts of gptq_cli its modules may import (besides themselves and __version__)
ALLOWED = {
    "data": {"errors", "settings"},
    "format": {"errors"},
    "kernels": {"format", "errors"},
    "model": {"format", "kernels", "errors"},
    "quantization": {"format", "model", "kernels", "errors", "settings"},
    "hub": {"format", "inspection", "errors"},
}


def gptq_imports(path: Path) -> set[str]:
    """The first component under gptq_cli of every gptq_cli module this file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "gptq_cli":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("gptq_cli."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gptq_cli.")}
    return found - {"__version__", "_C"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_sub_package_imports_only_what_it_may(package):
    modules = sorted((PACKAGE / package).glob("*.py"))
    assert modules, f"gptq_cli/{package} has no modules"
    docstring = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert docstring and "May import" in docstring, (
        f"gptq_cli/{package}/__init__.py says what it may import"
    )
    wrong = {
        f"{package}/{m.name}": sorted(gptq_imports(m) - ALLOWED[package] - {package})
        for m in modules
    }
    assert not {m: w for m, w in wrong.items() if w}


def test_the_table_catches_an_import_from_above(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from gptq_cli.api import quantize\nfrom gptq_cli import errors\n")
    assert gptq_imports(module) - ALLOWED["quantization"] == {"api"}


def test_no_module_shadows_the_standard_library():
    import sys

    names = {p.stem for p in PACKAGE.rglob("*.py")}
    assert not names & set(sys.stdlib_module_names) - {"__init__"}
