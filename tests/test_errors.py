"""One error family: every exception class fxgrow defines lives in fxgrow/errors.py, derives
from FxgrowError and carries the command line's exit code; nothing else is raised."""

import ast
import builtins
import importlib
import inspect
import pkgutil
from pathlib import Path

import fxgrow
from fxgrow import errors

PACKAGE = Path(fxgrow.__file__).parent


def _all_modules():
    names = ["fxgrow"] + [m.name for m in pkgutil.walk_packages(fxgrow.__path__, "fxgrow.")]
    return [importlib.import_module(name) for name in names]


def test_every_exception_class_of_the_package_is_in_errors_and_an_fxgrow_error():
    modules = _all_modules()
    assert len(modules) >= 30  # the walk really saw the package
    found = set()
    for module in modules:
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("fxgrow"):
                found.add(obj)
    # classes nested in functions or classes are found through the source below
    assert found, "no exception class found"
    for cls in found:
        assert cls.__module__ == "fxgrow.errors", f"{cls.__qualname__} is defined in {cls.__module__}"
        assert issubclass(cls, errors.FxgrowError), cls


def test_no_module_defines_an_exception_class_outside_errors_py():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                assert not any(b.endswith(("Error", "Exception")) for b in bases), \
                    f"{path.relative_to(PACKAGE)}: class {node.name}({', '.join(bases)})"


def test_no_builtin_exception_and_no_bare_fxgrow_error_is_raised():
    builtin = {name for name, obj in vars(builtins).items()
               if isinstance(obj, type) and issubclass(obj, BaseException)}
    raised = 0
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            raised += 1
            func = node.exc.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
            if name == "AttributeError" and _in_getattr(path, node.lineno):
                continue  # the module-attribute protocol requires it
            assert name not in builtin, f"{where} raises the builtin {name}"
            assert name != "FxgrowError", f"{where} raises the bare FxgrowError"
    assert raised > 100  # the walk really saw the raises


def _in_getattr(path, lineno):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            if node.lineno <= lineno <= node.end_lineno:
                return True
    return False


def test_exit_codes():
    codes = {cls: cls.exit_code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.FxgrowError)}
    assert codes[errors.EquivalenceError] == 1
    assert codes[errors.DistributedError] == 3
    assert codes[errors.StorageError] == 4
    assert codes[errors.InternalError] == 5
    special = (errors.EquivalenceError, errors.DistributedError, errors.StorageError,
               errors.InternalError)
    others = {c for c in codes if c not in special}
    assert others and all(codes[c] == 2 for c in others)


def test_distributed_error_is_the_one_in_errors():
    from fxgrow.training import distributed

    assert distributed.DistributedError is errors.DistributedError
