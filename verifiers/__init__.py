"""verifiers: sound bounds, certified radii and complete verification of PyTorch and ONNX networks.

The public API (everything else is internal and may change). Names load on first use, so importing
``verifiers`` costs nothing until a bound is asked for::

    from verifiers import Perturbation, margin_lower_bound, crown_radius, cascade

Perturbations: ``Norm``, ``Perturbation``, ``parse_norm``, ``parse_eps``.
Bounds: ``BoundMethod``, ``compute_bounds``, ``box_bounds``, ``margin_lower_bound``, ``margin_lower_bounds``,
``linear_bound``, ``CrownOptions``, ``LinearBound``.
Radii: ``certified_radius`` (bisection, any method), ``crown_radius`` (root search on full CROWN).
Verification: ``VerifyOptions``, ``get_method``, ``verify_methods``, ``cascade``, ``radii``, ``Status``,
``SampleResult``, ``SoundnessError``.
Complete verification: ``BabOptions``, ``Specification``, ``relu_branch_and_bound``, ``input_branch_and_bound``.
ONNX and VNN-LIB: ``load_onnx``, ``parse_vnnlib``, ``check_property``.
Errors: ``VerifierError`` and its kinds ``BoundInputError``, ``UnsupportedModelError``,
``EnvironmentVersionError`` (one-line messages about the input or the installation, not bugs).
"""
from importlib import import_module
from typing import Any, Dict

_WHERE: Dict[str, str] = {
    **dict.fromkeys(("Norm", "Perturbation", "parse_norm", "parse_eps"), "perturbation"),
    **dict.fromkeys(("BoundMethod", "compute_bounds", "box_bounds", "margin_lower_bound", "margin_lower_bounds"),
                    "bounds"),
    **dict.fromkeys(("linear_bound", "CrownOptions", "LinearBound"), "crown"),
    **dict.fromkeys(("certified_radius", "crown_radius"), "radius"),
    **dict.fromkeys(("VerifyOptions", "get_method", "verify_methods", "cascade", "radii", "Status", "SampleResult",
                     "SoundnessError"), "verify"),
    **dict.fromkeys(("BabOptions", "Specification", "relu_branch_and_bound", "input_branch_and_bound"), "bab"),
    "load_onnx": "onnx_model", "parse_vnnlib": "vnnlib", "check_property": "vnn",
    **dict.fromkeys(("VerifierError", "BoundInputError", "UnsupportedModelError", "EnvironmentVersionError"), "errors"),
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'verifiers' has no attribute {name!r}")
    value = getattr(import_module(f"verifiers.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
