"""Where an error or a decision came from, as one ``at FILE:LINE``: the innermost frame of the user's own
files, else of the library that holds the model (``transformers/models/blt/modeling_blt.py:123``), never
effcompile's, the standard library's or the tracer's (torch) frames."""

from __future__ import annotations

import functools
import importlib.util
import pkgutil
import sysconfig
import traceback
from pathlib import Path


@functools.cache
def _package_dirs() -> tuple[str, ...]:
    """effcompile's own source folders (the package's and each sub-package's, wherever the installation maps
    them; as found and resolved), so that an error's location can skip them and name the user's line."""
    import effcompile

    folders = [Path(p) for p in effcompile.__path__]
    for module in pkgutil.iter_modules(effcompile.__path__):
        if module.ispkg:
            spec = importlib.util.find_spec(f"{effcompile.__name__}.{module.name}")
            if spec is not None:
                folders.extend(Path(p) for p in spec.submodule_search_locations or [])
    return tuple(sorted({str(f) + "/" for folder in folders for f in (folder, folder.resolve())}))


# Libraries whose frames are the tracer's, not the model's: an error's location skips them.
_TRACER_PACKAGES = ("torch/", "functorch/", "torchgen/", "sympy/", "_pytest/", "pluggy/")


def error_line(error: BaseException) -> str:
    """One line: the exception and where it came from — the innermost frame of the user's own files, else
    of the library that holds the model (``transformers/models/blt/modeling_blt.py:123``), never effcompile's
    or the tracer's (torch) frames."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {message[:160]}{model_frame(traceback.extract_tb(error.__traceback__))}"


def model_frame(frames: traceback.StackSummary | list[traceback.FrameSummary], innermost: bool = False) -> str:
    """`` at FILE:LINE`` of the innermost frame of the user's own files, else of the library that holds the
    model (``innermost``: of either, whichever is deeper); "" when every frame is effcompile's, the standard
    library's or the tracer's."""
    own = _package_dirs() + (sysconfig.get_paths()["stdlib"] + "/",)
    frames = [f for f in frames if not f.filename.startswith("<")
              and not f.filename.startswith(own) and not str(Path(f.filename).resolve()).startswith(own)]
    user = [f for f in frames if "site-packages/" not in f.filename]
    library = [f for f in frames if "site-packages/" in f.filename
               and not f.filename.split("site-packages/", 1)[1].startswith(_TRACER_PACKAGES)]
    if innermost and user and library:
        deepest = max(user[-1], library[-1], key=lambda f: frames.index(f))
        user, library = ([deepest], []) if deepest is user[-1] else ([], [deepest])
    if user:
        return f" at {user[-1].filename}:{user[-1].lineno}"
    if library:
        return f" at {library[-1].filename.split('site-packages/', 1)[1]}:{library[-1].lineno}"
    return ""
