"""Test an app's handlers: a harness on the embedded broker, `call_handler` without one, and pytest fixtures.

The pytest plugin (`eventbus.testing.plugin`, registered by the package's entry point)
gives each test the app's worker on a session-wide embedded broker, in a namespace of its own::

    async def test_charge(eventbus_app):
        await eventbus_app.publish("orders", Order(id="o-1", qty=2), key="o-1")
        [invoice] = await eventbus_app.wait_published(topic="invoices")
"""

from ..observing.events import DeadLettered, Handled, Published
from .calls import CallResult, RecordingPublisher, call_handler, find_subscription
from .harness import Harness, Recorder

__all__ = [
    "CallResult",
    "DeadLettered",
    "Handled",
    "Harness",
    "Published",
    "Recorder",
    "RecordingPublisher",
    "call_handler",
    "find_subscription",
]
