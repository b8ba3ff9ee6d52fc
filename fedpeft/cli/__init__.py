"""The ``fedpeft`` command line."""
