"""Which of a class's methods are collective under several ranks: declared on each method.

Under ``torchrun`` with several ranks, a collective method (training, sampling, adapters, files) must
be called on every rank with the same arguments; a local one reads this rank's state only. Each public
method says which it is (``@collective`` or ``@local``), so the service's lock step (rank 0 announces
each collective call to the others) is derived from the methods themselves, and ``check_declared``
refuses a class with a public method that says neither: a new method cannot be left out by mistake.
"""

from __future__ import annotations

import inspect
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)
_MARK = "__colo_ranks__"


def collective(method: F) -> F:
    """Every rank makes this call, with the same arguments."""
    setattr(method, _MARK, "collective")
    return method


def local(method: F) -> F:
    """This rank's own state only: safe to call on one rank."""
    setattr(method, _MARK, "local")
    return method


def _public_methods(cls: type) -> dict[str, Callable]:
    return {name: fn for name, fn in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def collective_methods(cls: type) -> frozenset[str]:
    return frozenset(name for name, fn in _public_methods(cls).items() if getattr(fn, _MARK, None) == "collective")


def check_declared(cls: type) -> None:
    """Raise TypeError naming every public method of ``cls`` that is declared neither collective nor local."""
    undeclared = sorted(name for name, fn in _public_methods(cls).items() if getattr(fn, _MARK, None) is None)
    if undeclared:
        raise TypeError(f"{cls.__qualname__}: {', '.join(undeclared)} must be declared @collective or @local "
                        "(colo.collective): under several ranks the service mirrors the collective ones")
