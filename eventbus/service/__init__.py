"""What a handler is built from: its wrapping, its dependencies, middleware, and what its return value becomes."""
