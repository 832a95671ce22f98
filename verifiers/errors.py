"""Exceptions users can act on. The CLI turns them into one line on stderr and exit code 2."""


class CertnasError(ValueError):
    """Base class of errors caused by input, not by a bug."""


class BoundInputError(CertnasError):
    """Bad arguments to a bound computation: eps, norm, method, shapes, NaN."""


class UnsupportedModelError(CertnasError):
    """The model contains a layer or operation the bound engine cannot bound soundly."""
