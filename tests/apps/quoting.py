"""A handler whose error quotes the payload's text, as validation errors do (EB_TOPIC): the text is the author's."""

from __future__ import annotations

import os

from eventbus import subscribe


@subscribe(os.environ["EB_TOPIC"], "g", max_retries=0, initial_position="earliest")
async def check(body: dict[str, str]) -> None:
    raise ValueError(f"unknown field {body['field']}")
