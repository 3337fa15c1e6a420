"""Every docstring example in the package runs and prints what it claims."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import drm_lightning

MODULES = sorted(
    ["drm_lightning"]
    + [m.name for m in pkgutil.walk_packages(drm_lightning.__path__, prefix="drm_lightning.")]
)


def test_modules_found() -> None:
    """Every package module whose source holds a docstring example is collected."""
    package = Path(drm_lightning.__file__).parent
    with_examples = {
        ".".join(("drm_lightning", *f.relative_to(package).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for f in package.rglob("*.py")
        if ">>>" in f.read_text()
    }
    missing = sorted(with_examples - set(MODULES))
    assert not missing, f"modules with examples not collected: {missing}"


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name: str) -> None:
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"
