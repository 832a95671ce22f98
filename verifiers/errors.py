"""Exceptions users can act on. A command-line front end turns them into one line on stderr and exit code 2."""


class VerifierError(ValueError):
    """Base class of the errors of ``verifiers`` caused by input, not by a bug."""


class BoundInputError(VerifierError):
    """Bad arguments to a bound computation: eps, norm, method, shapes, NaN."""


class UnsupportedModelError(VerifierError):
    """The model contains a layer or operation the bound engine cannot bound soundly."""


class EnvironmentVersionError(VerifierError):
    """An installed package of another version than the one this code was tested with (auto-LiRPA)."""
