"""The fedpeft ServerApp: the coordinator that runs rounds, evaluates and writes the run directory."""
