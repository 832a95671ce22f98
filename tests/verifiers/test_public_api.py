"""``verifiers/__init__.py`` states the public API: every name it lists resolves to the object of the module
that defines it, an unknown name is an AttributeError, and importing the package loads none of its modules."""
import importlib
import subprocess
import sys

import pytest

import verifiers


@pytest.mark.parametrize("name", verifiers.__all__)
def test_every_public_name_resolves_to_its_module(name):
    value = getattr(verifiers, name)
    module = importlib.import_module(f"verifiers.{verifiers._WHERE[name]}")
    assert value is getattr(module, name)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        verifiers.no_such_thing  # noqa: B018


def test_importing_the_package_loads_no_submodule():
    code = "import sys, verifiers; print(sorted(m for m in sys.modules if m.startswith('verifiers.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
