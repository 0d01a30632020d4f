"""Running an app: the worker over every subscription, what it opens and closes around them, worker processes."""
