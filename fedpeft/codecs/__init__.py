"""Update codecs: how a site's adapter update is written on the wire (one codec per file).

Registered names: ``none``, ``fp16``, ``int8[:row]``, ``int4[:row]``, ``topk:<fraction>``,
``ternary[:fraction]``, ``compeft[:density]``, ``shared:<density>[:<bound>]``; compose with ``+`` (``topk:0.1+int8``).
:func:`parse_codec` turns a spec into a :class:`Codec`; :func:`compress` adds error feedback. The wire
framing (header, byte layout) is in :mod:`fedpeft.wire`.
"""

from fedpeft.codecs import compeft, fp16, int4, int8, none, shared, ternary, topk  # noqa: F401 - each registers itself
from fedpeft.codecs.base import CodecError, Part
from fedpeft.codecs.chain import Codec, parse_codec
from fedpeft.codecs.feedback import compress
from fedpeft.codecs.registry import CODECS

__all__ = ["CODECS", "Codec", "CodecError", "Part", "compress", "parse_codec"]
