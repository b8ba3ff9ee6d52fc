"""The fedpeft ClientApp: one per hospital/edge site (or per simulated partition)."""
