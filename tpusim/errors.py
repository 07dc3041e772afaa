"""The one error type for everything a user gave us wrong.

A :class:`TpusimError` names where the problem is (the file and the key, when there is one) and why.
The CLI prints it as one line and exits non-zero; library users can catch it (a sweep turns it into a
row that says why the configuration is invalid).
"""

from __future__ import annotations


class TpusimError(Exception):
    """A problem with the user's input: a bad file, key, value, topology or configuration.

    Parameters
    ----------
    reason:
        What is wrong, in words a user can act on.
    source:
        The file (or the command-line option) the bad value came from, if any.
    key:
        The dotted key inside that file, if any.
    """

    def __init__(self, reason: str, *, source: str | None = None, key: str | None = None):
        self.reason = reason
        self.source = source
        self.key = key
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = ": ".join(part for part in (self.source, self.key) if part)
        return f"{where}: {self.reason}" if where else self.reason

    def within(self, source: str) -> "TpusimError":
        """The same error, attributed to ``source`` if it had no source yet."""
        if self.source is None:
            return TpusimError(self.reason, source=source, key=self.key)
        return self


class InfeasibleError(TpusimError):
    """A well-formed configuration that cannot run: it does not fit in HBM, or the mesh does not fit."""
