"""``python -m client.worker``: see :func:`client.worker.main`."""

from client.worker import main

raise SystemExit(main())
