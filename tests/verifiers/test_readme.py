"""The README's Python example runs as written, and what it prints is sound."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_example_runs_and_its_radii_are_certified():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - the project's own README
    margin, radius, net, x, y = (namespace[k] for k in ("margin", "radius", "net", "x", "y"))
    assert margin.shape == radius.shape == (4,)
    assert (radius >= 0).all() and (radius <= 0.5).all()
    from verifiers.bounds import margin_lower_bound
    certified = radius > 0
    if certified.any():  # the tape's bound certifies each radius it returned
        import torch
        with torch.no_grad():
            assert (margin_lower_bound(net, x[certified], y[certified], radius[certified], method="crown") > 0).all()
