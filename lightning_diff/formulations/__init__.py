"""Formulations as data: ``get(name, **overrides)`` builds one, ``names()`` lists them.

Every family of the papers (EDM Table 1 plus DDPM, sub-VP, NCSN and rectified flow) is a small
``Formulation`` subclass whose constants are keyword defaults; see ``base.Formulation``.
"""

from __future__ import annotations

from .base import Formulation
from .consistency import Consistency
from .discrete import DDPM, IDDPM, NCSN
from .edm import EDM
from .flow import RectifiedFlow
from .ve import VE
from .vp import VP, SubVP

__all__ = ["Formulation", "EDM", "VP", "SubVP", "VE", "NCSN", "DDPM", "IDDPM", "RectifiedFlow", "Consistency", "get",
           "names", "REGISTRY"]

REGISTRY: dict[str, type[Formulation]] = {
    cls.name: cls for cls in (EDM, VP, SubVP, VE, NCSN, DDPM, IDDPM, RectifiedFlow, Consistency)
}


def names() -> list[str]:
    """Registry names of all formulations."""
    return list(REGISTRY)


def get(name: str, **overrides) -> Formulation:
    """Build formulation ``name`` with the paper's constants, replaced by ``overrides``.

    Raises ``ValueError`` naming the allowed names or the constructor's settings on bad input.
    """
    if name not in REGISTRY:
        raise ValueError(f"formulation={name!r} is not known; allowed: {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    try:
        return cls(**overrides)
    except TypeError as err:
        import inspect

        allowed = [p for p in inspect.signature(cls).parameters]
        raise ValueError(f"formulation={name}: bad settings {sorted(overrides)} ({err}); "
                         f"allowed: {', '.join(allowed)}") from None
