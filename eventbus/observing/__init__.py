"""What a worker shows of itself: metrics, traces, log lines, the observer's events and the HTTP probes."""
