"""fedpeft: federated, privacy-preserving parameter-efficient fine-tuning on Flower.

The shared package: configuration, model and adapter surgery, data loading and partitioning, local
training, and the ``fedpeft`` command line. It never talks to Flower directly; ``client/`` and
``server/`` route Flower messages to it.
"""

__version__ = "0.1.0"
