"""What a saved folder may name from effcompile itself: the module classes and functions passes put into
graphs, each registered with ``@serializable``.

A pass that installs a module class or inserts a call to one of its functions decorates it::

    @serializable(transient={"_cache": dict})
    class SparseAttention(torch.nn.Module): ...

    @serializable
    def autocast_input(x): ...

A registered class is rebuilt on load without running its ``__init__`` (``cls.__new__`` +
``nn.Module.__init__``, then its attributes from the folder's JSON); ``transient`` names the attributes
that are not data (caches, compiled kernels), each with a zero-argument factory for its value after
loading. Saving a module whose class is not registered, or that holds an attribute that is neither
JSON-like data nor declared transient, fails at save time and names the class to fix.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

T = TypeVar("T")
log = logging.getLogger(__name__)
#: An instance attribute a pass sets on a module it installs from another library that this format cannot
#: store (e.g. torchao's ``Float8Linear``): a one-line reason with the fix. Saving such a module raises
#: NotAllowed with it instead of the generic "not an allow-listed class" message.
UNSAVEABLE = "effcompile_unsaveable"


@dataclass(frozen=True)
class Registered:
    """One registered class or function: its name in saved folders and, for classes, its transients."""

    name: str
    obj: Any
    transient: Mapping[str, Callable[[], Any]] = field(default_factory=dict)


class RegistrationError(Exception):
    """Raised while saving: an effcompile class or function is not registered, or holds an attribute that
    is neither data nor declared transient. A bug in effcompile (a pass forgot ``@serializable``), so it is
    not an EffcompileError: the CLI reports it as an internal error (exit 3)."""


_BY_NAME: dict[str, Registered] = {}
_BY_ID: dict[int, Registered] = {}


@overload
def serializable(obj: T) -> T: ...


@overload
def serializable(*, name: str | None = None,
                 transient: Mapping[str, Callable[[], Any]] | None = None) -> Callable[[T], T]: ...


def serializable(obj: Any = None, *, name: str | None = None,
                 transient: Mapping[str, Callable[[], Any]] | None = None) -> Any:
    """Register an ``nn.Module`` subclass or a function so saved folders may name it.

    ``name`` is the name stored in ``structure.json`` (default: the ``__qualname__``; it must be unique
    among registered objects). ``transient`` maps attribute names of a class that are not saved to a
    zero-argument factory giving their value after loading (e.g. ``{"_block_masks": dict}``).
    Raises ValueError for a duplicate name or a transient on a function.
    """

    def decorate(target: Any) -> Any:
        if transient and not isinstance(target, type):
            raise ValueError(f"serializable: transient attributes apply to classes, not to {target!r}")
        key = name or target.__qualname__
        known = _BY_NAME.get(key)
        if known is not None and known.obj is not target and _qualified(known.obj) != _qualified(target):
            raise ValueError(f"serializable: {key!r} is already registered for {_qualified(known.obj)}; "
                             "pass name=... to register under another name")
        entry = Registered(key, target, dict(transient or {}))
        _BY_NAME[key] = entry
        _BY_ID[id(target)] = entry
        return target

    return decorate(obj) if obj is not None else decorate


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def registration_of(obj: Any) -> Registered | None:
    """The registration of a class or function (by identity), or None."""
    entry = _BY_ID.get(id(obj))
    return entry if entry is not None and entry.obj is obj else None


def registered(name: str) -> Registered | None:
    """The registered class or function saved under ``name``, or None. Imports every pass module first,
    so that their registrations have run."""
    if name not in _BY_NAME:
        import_pass_modules()
    return _BY_NAME.get(name)


def import_pass_modules() -> list[str]:
    """Import every module under ``effcompile.passes`` (each pass registers its classes at import);
    returns their names."""
    from .. import passes as package

    names = []
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.", onerror=lambda name: None):
        try:
            importlib.import_module(info.name)
        except ImportError as error:  # an optional dependency (a GPU kernel library) is absent here
            log.debug("not importing %s: %s", info.name, error)
            continue
        names.append(info.name)
    return names


def is_effcompile_object(obj: Any) -> bool:
    """True for classes and functions defined in effcompile's own modules (which must be registered)."""
    module = getattr(obj, "__module__", "") or ""
    return module == "effcompile" or module.startswith("effcompile.")
