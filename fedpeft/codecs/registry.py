"""The codec registry: name → factory of one *piece* of a codec chain.

A factory takes the text after ``name:`` (or None) and returns ``(sparsifier, value stage)``, either
of which may be None: ``topk:0.1`` gives only a sparsifier, ``int8`` only a value stage, ``ternary``
both. :func:`fedpeft.codecs.chain.parse_codec` joins the pieces of ``a+b``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedpeft.codecs.base import CodecError
from fedpeft.registry import Registry

Piece = tuple[Any, Any]  # (Sparsifier | None, ValueStage | None)
Factory = Callable[[str | None], Piece]

CODECS: Registry[Factory] = Registry("codec")


def no_argument(name: str, stage: Callable[[], Any]) -> Factory:
    """A factory for a value stage that takes no argument."""

    def factory(arg: str | None) -> Piece:
        if arg is not None:
            raise CodecError(f"codec {name!r} takes no argument, got {name}:{arg}")
        return None, stage()

    return factory


def block_argument(name: str, stage: Callable[[int], Any], default: int = 256) -> Factory:
    """A factory for a quantiser with an optional row length: ``int8`` or ``int8:64``."""

    def factory(arg: str | None) -> Piece:
        if arg is None:
            return None, stage(default)
        try:
            block = int(arg)
        except ValueError:
            block = 0
        if not 1 <= block <= 1 << 20:
            raise CodecError(f"{name}:<row> needs a row length in 1..{1 << 20}, got {arg!r}")
        return None, stage(block)

    return factory


def fraction(name: str, arg: str | None, default: float | None) -> float:
    """The ``<fraction>`` of ``topk:<fraction>``: a number in (0, 1]."""
    if arg is None:
        if default is None:
            raise CodecError(f"codec {name!r} needs a fraction, e.g. {name}:0.1")
        return default
    try:
        value = float(arg)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise CodecError(f"{name}:<fraction> needs a fraction in (0, 1], got {arg!r}")
    return value
