"""Handlers on a Router, run as `eventbus run tests.apps.router_app:router`; EB_TOPIC and EB_RECORD as recorder's."""

from __future__ import annotations

import os

from eventbus import Router

router = Router()


@router.subscribe(os.environ.get("EB_TOPIC", "router-app"), "g", initial_position="earliest")
def record(body: dict[str, object]) -> None:
    with open(os.environ["EB_RECORD"], "a") as f:
        f.write(f"{body}\n")
