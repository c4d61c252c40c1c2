"""fxgrow's exception classes. Every error fxgrow raises on bad input is one of these."""


class FxgrowError(Exception):
    """Base class of every error fxgrow raises on purpose."""


class TraceError(FxgrowError):
    """A model could not be turned into a torch.fx GraphModule."""


class ReduceError(FxgrowError):
    """A width reduction that cannot be honoured (tied width, non-dividing ratio, ...)."""


class PlanError(FxgrowError):
    """A growth plan that does not fit the graph it is applied to."""


class AnalysisError(FxgrowError):
    """The splitting analysis was given data or targets it cannot use."""


class EquivalenceError(FxgrowError):
    """Two graphs that should compute the same function do not."""


class CheckpointError(FxgrowError):
    """A saved model or run that is truncated, tampered with or does not match."""


class ScheduleError(FxgrowError):
    """An invalid scaling schedule or training configuration."""


class DataError(FxgrowError):
    """A dataset that is missing, empty or unreadable."""


class ModelError(FxgrowError):
    """A model spec or builder name that fxgrow cannot build."""


class WidenError(FxgrowError):
    """A width expansion the model's structure does not allow (no residual stream, a width
    that does not fit the heads or the MLP ratio, an unknown operator)."""


class DeepenError(FxgrowError):
    """A depth expansion the model's structure does not allow (no repeated blocks, a block
    that reads values from outside it, an unknown operator)."""


class StudyError(FxgrowError):
    """A study spec that cannot be run, or a study directory that holds another study."""
