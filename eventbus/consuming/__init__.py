"""A subscription's path from the broker to a handler and back: membership, intake, lanes, attempts, dead letters."""
