"""fedpeft: federated, privacy-preserving parameter-efficient fine-tuning on Flower.

The shared package: configuration, model and adapter surgery, data loading and partitioning, local
training, and the ``fedpeft`` command line. Its modelling and training code never talks to Flower;
``client/`` and ``server/`` route Flower messages to it. The exceptions are the record types of
:mod:`fedpeft.protocol` and :mod:`fedpeft.wire` (Flower's public ``flwr.app``) and :mod:`fedpeft.deploy`,
which starts Flower's SuperLink and SuperNodes and keeps every use of Flower's internals in one checked
module (:mod:`fedpeft.deploy.flower_compat`).

``__version__`` is the installed distribution's version, i.e. pyproject.toml's: the one version a site
worker compares with a run's app (whose FAB carries the same pyproject.toml).
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("fedpeft")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
