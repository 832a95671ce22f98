"""``verifiers`` is a library of its own: neither it nor its tests import certnas (``make test`` also runs
tests/verifiers with certnas blocked, ``-p tests.without_certnas``)."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _certnas_imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            if name == "certnas" or name.startswith("certnas."):
                yield f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"


def test_no_module_of_verifiers_or_of_its_tests_imports_certnas():
    files = sorted((ROOT / "verifiers").glob("*.py")) + sorted((ROOT / "tests" / "verifiers").glob("*.py")) + \
        [ROOT / "tests" / "violation.py", ROOT / "tests" / "conftest.py"]
    found = [hit for path in files for hit in _certnas_imports(path)]
    assert not found, found


def test_verifiers_imports_and_its_tests_collect_with_certnas_blocked():
    modules = [p.stem for p in (ROOT / "verifiers").glob("*.py") if p.stem != "__init__"]
    code = "import sys\nimport tests.without_certnas\n" + "".join(f"import verifiers.{m}\n" for m in modules) + \
        "import pytest\nsys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/verifiers']))\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # a collection error prints "ERROR collecting ..." and "N error(s)" (test ids may name error classes)
    assert "ERROR" not in done.stdout and not re.search(r"\b\d+ errors?\b", done.stdout), done.stdout[-2000:]
