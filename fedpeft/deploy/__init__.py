"""Real deployment: credentials for a SuperLink and its SuperNodes, and the commands that start them.

``certs`` makes the CA, the SuperLink's TLS certificate and one authentication key pair per site;
``commands`` builds the ``flower-superlink`` / ``flower-supernode`` command lines (TLS on, node
authentication on, gRPC-rere Fleet API) that ``fedpeft link`` and ``fedpeft node`` run; ``supervise``
runs a site's worker and SuperNode together; ``supernode`` and ``objects`` say how fedpeft paces Flower's
polling and object pulls; ``flower_compat`` is the one module that uses Flower's internals, and checks them.
"""
