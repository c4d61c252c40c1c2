"""fxgrow's exception classes. Every error fxgrow raises is one of these.

Each class carries ``exit_code``, the status the ``fxgrow`` command line exits with when it
is raised:

====  ========================================================================
code  meaning
====  ========================================================================
0     success
1     verification failed (:class:`EquivalenceError`)
2     bad input or usage; nothing was written (every other class)
3     another rank failed or a collective timed out (:class:`DistributedError`)
4     the disk refused a write or a read: full, read-only, a path that is a
      file, permissions (:class:`StorageError`)
5     an internal consistency check failed: a bug in fxgrow (:class:`InternalError`)
====  ========================================================================
"""


class FxgrowError(Exception):
    """Base class of every error fxgrow raises on purpose."""

    exit_code = 2


class ConfigError(FxgrowError):
    """An option or argument that is out of range, of the wrong type, or malformed JSON."""


class TraceError(FxgrowError):
    """A model could not be turned into a torch.fx GraphModule, or the traced graph does not
    compute what the eager model computes."""


class ReduceError(FxgrowError):
    """A width reduction that cannot be honoured (tied width, non-dividing ratio, ...)."""


class PlanError(FxgrowError):
    """A growth plan or selection budget that does not fit the graph it is applied to."""


class AnalysisError(FxgrowError):
    """The splitting analysis was given data or targets it cannot use."""


class EquivalenceError(FxgrowError):
    """Two graphs that should compute the same function do not."""

    exit_code = 1


class CheckpointError(FxgrowError):
    """A saved model or run that is truncated, tampered with or does not match."""


class RunLockedError(CheckpointError):
    """Another live process holds the run directory's lock."""


class ScheduleError(ConfigError):
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


class FlopCountError(FxgrowError):
    """FLOPs that cannot be counted, or two counters that disagree."""


class OptimizerError(FxgrowError):
    """An optimizer whose param groups or state do not fit the model."""


class InspectionError(FxgrowError):
    """A summary or drawing asked of a target or input that does not fit the graph."""


class DistributedError(FxgrowError):
    """Ranks disagree (plan, parameters) or a collective failed or timed out."""

    exit_code = 3


class StorageError(FxgrowError):
    """The file system refused an operation: no space left, a read-only file system, a path
    component that is a file, missing permission. Nothing was half-written."""

    exit_code = 4


class InternalError(FxgrowError):
    """An internal consistency check failed: a bug in fxgrow, please report it."""

    exit_code = 5


class GrownTreeMismatch(FxgrowError):
    """Internal to packing: a grown subgraph is not the one ``grow`` writes (edited since),
    so it is left as it is. Caught where it is raised; never reaches a caller."""


class ShapeQueryNeedsValues(FxgrowError):
    """Internal to width-group discovery: a shape argument can only be decided by running
    the graph on real values. Caught where it is raised; never reaches a caller."""


def storage_error(exc: OSError, what: str) -> StorageError:
    """A :class:`StorageError` for the ``OSError`` ``exc`` raised while doing ``what``
    (say what the disk said: full, read-only, not a directory, ...)."""
    import errno
    import os

    reasons = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "the file system is read-only",
        errno.ENOTDIR: "a component of the path is a file, not a directory",
        errno.EEXIST: "the path already exists",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EISDIR: "the path is a directory",
        errno.EFBIG: "file too large for the file-size limit (ulimit -f) or the file system",
    }
    reason = reasons.get(exc.errno) or (os.strerror(exc.errno) if exc.errno else str(exc))
    filename = getattr(exc, "filename", None)
    if exc.errno == errno.EEXIST and filename and not os.path.isdir(filename):
        reason = "a component of the path is a file, not a directory"
    where = f" ({filename})" if filename else ""
    return StorageError(f"{what} failed: {reason}{where}")
