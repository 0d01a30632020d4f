from .cli import entry

entry("python -m eventbus")
