"""Errors a user can act on. Each names the problem in its message."""


class SleepwakeError(Exception):
    """Base class: anything the CLI reports as a one-line error."""


class InvalidFactError(SleepwakeError, ValueError):
    """A fact field is empty, too long, or of the wrong type."""


class InvalidRequestError(SleepwakeError, ValueError):
    """An option is out of its range or of the wrong type (sampling, export rank, ...)."""


class UnsupportedError(InvalidRequestError):
    """A request asks for something this server does not implement (tools, logprobs, n > 1, ...)."""


class FactFileError(SleepwakeError, ValueError):
    """A JSONL facts file is malformed; the message names the line."""


class ModelNotFoundError(SleepwakeError):
    """`--model` names nothing that can be loaded without a network."""


class UnsupportedArchitectureError(SleepwakeError):
    """The model loads, but we do not know where its MLP down-projection is."""


class UnknownFactError(SleepwakeError, KeyError):
    """No active fact has this id."""

    def __str__(self) -> str:  # KeyError would print the repr with quotes
        return str(self.args[0]) if self.args else "unknown fact"


class StoreError(SleepwakeError):
    """The memory home is unusable (wrong model, corrupt ledger, ...)."""


class HomeBusyError(StoreError):
    """Another live process writes this memory home (`homelock`); `holder` says which."""

    def __init__(self, message: str, holder: object = None) -> None:
        super().__init__(message)
        self.holder = holder


class UnknownCycleError(SleepwakeError, KeyError):
    """No sleep cycle with this id, or not one that can be rolled back."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown cycle"


class SleepRunningError(SleepwakeError):
    """A nap or deep sleep is running: the memory cannot change until it ends."""


class InvalidUserError(InvalidRequestError):
    """A user name that is not a safe directory name."""


class WrongUserError(SleepwakeError):
    """A request names a user its API key does not reach."""
