"""Agent messages: plain JSON, answered in a worker thread (a sync handler)."""

from __future__ import annotations

import logging

from eventbus import Message, subscribe

log = logging.getLogger("handlers.agents")

TOPIC = "agent.messages"


@subscribe(TOPIC, "agent-inbox", subscription_type="shared", concurrency=2, initial_position="earliest")
def on_agent_message(body: dict, msg: Message) -> None:
    log.info("agent %s -> %s: %s", body.get("from", "?"), body.get("to", "?"), body.get("text", ""))
