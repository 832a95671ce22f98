"""pytest plugin (``-p tests.without_certnas``): any import of certnas fails, so the tests of ``verifiers``
show that the library runs without certnas (the Makefile runs tests/verifiers with it)."""
import importlib.abc
import sys


class _BlockCertnas(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "certnas" or name.startswith("certnas."):
            raise ImportError(f"import of {name} blocked: verifiers and its tests must not need certnas")
        return None


if not any(isinstance(finder, _BlockCertnas) for finder in sys.meta_path):
    sys.meta_path.insert(0, _BlockCertnas())
for loaded in [m for m in sys.modules if m == "certnas" or m.startswith("certnas.")]:
    del sys.modules[loaded]
