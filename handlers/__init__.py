"""Example app: workflow runs, agent messages and a data pipeline.

`python -m eventbus run handlers` runs these handlers; add `handlers.demo` to
feed them with demo events from the same process.
"""

from . import agents, pipeline, workflow

__all__ = ["agents", "pipeline", "workflow"]
