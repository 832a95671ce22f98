"""The base of certnas' own user-facing errors (the CLI prints one line and exits 2 on these and on
``verifiers.errors.VerifierError``)."""


class CertnasError(ValueError):
    """Base class of errors caused by input, not by a bug."""
