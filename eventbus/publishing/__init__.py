"""Sending: one producer per topic, the bus's sending chosen at start, and request/reply."""
