"""The house DESIGN.md draws, checked: layers import only downward, and generic code names no method.

Layers, lowest first: ``adapters`` < ``datamodules`` < ``callbacks`` < the entry points (``clip_adapters``,
``train.py``, ``evaluate.py``, ``benchmark.py``). A method's knowledge lives in its own file under
``adapters/``: the generic modules may mention a method in a comment or docstring, never in code.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from tests.conftest import ROOT

LAYERS = ["adapters", "datamodules", "callbacks", "clip_adapters"]
GENERIC = [ROOT / "train.py", ROOT / "evaluate.py", *sorted((ROOT / "datamodules").glob("*.py")),
           *sorted((ROOT / "callbacks").glob("*.py")), *sorted((ROOT / "clip_adapters").glob("*.py"))]
METHOD_NAMES = re.compile(r"coder|isoclip|imo|tip|dac|mixing|gda", re.I)


def _imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_no_module_imports_upward(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1:]) | {"train", "evaluate", "benchmark", "demo", "bench", "tests"}
    offenders = {str(p.relative_to(ROOT)): sorted(_imported_packages(p) & above)
                 for p in sorted((ROOT / layer).glob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_adapters_base_does_not_reach_into_the_package_init():
    tree = ast.parse((ROOT / "adapters" / "base.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "adapters" not in modules  # `from adapters import ...` would run the method registry upward


def _code_names(path: Path) -> list[str]:
    """The identifiers and string literals of a module that are not docstrings or comments."""
    source = path.read_text()
    docstrings = {(n.body[0].value.lineno, n.body[0].value.col_offset)
                  for n in ast.walk(ast.parse(source))
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
                  and isinstance(n.body[0].value.value, str)}
    words = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME or (tok.type == tokenize.STRING and tok.start not in docstrings):
            words.append(tok.string)
    return words


@pytest.mark.parametrize("path", GENERIC, ids=lambda p: str(p.relative_to(ROOT)))
def test_generic_code_names_no_method(path):
    # "multiprocessing" contains "tip": match whole words and identifier parts, not substrings of other words
    hits = [w for w in _code_names(path) if any(METHOD_NAMES.fullmatch(part)
                                                 for part in re.split(r"[^A-Za-z]+|(?<=[a-z])(?=[A-Z])", w))]
    assert not hits, f"{path.relative_to(ROOT)} names methods in code: {sorted(set(hits))}"


def test_the_installed_distribution_holds_the_packages_and_commands_only():
    """Nothing named ``train``, ``evaluate``, ``demo`` or ``bench`` is installed (they would shadow Hugging
    Face's ``evaluate`` and friends); the entry points are console scripts."""
    import configparser

    from setuptools import find_packages  # what `packages = find:` runs

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = cfg["options.packages.find"]["include"].split()
    packages = find_packages(str(ROOT), include=include)
    assert {p.split(".")[0] for p in packages} == {"adapters", "datamodules", "callbacks", "clip_adapters"}
    scripts = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].split("\n") if line)
    assert scripts == {"clip-adapters-train": "clip_adapters.train:main",
                       "clip-adapters-evaluate": "clip_adapters.evaluate:main",
                       "clip-adapters-benchmark": "clip_adapters.benchmark:main"}
