"""Handler registration: `@subscribe(topic, group)` and `Router` record what to run and how."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import typing
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, TypeVar, Unpack

from pydantic import BaseModel

from .codec import decoder_for
from .errors import ConfigError
from .service.handler import Handler, Publisher, handler_name
from .service.middleware import checked
from .schemas import PayloadSchema, SchemaUnsupported, json_schema_of
from .settings import topic_problem
from .topics import dead_letter_topic, retry_topic

log = logging.getLogger("eventbus")

SubscriptionType = Literal["key_shared", "shared", "failover", "exclusive"]
InitialPosition = Literal["latest", "earliest"]
SUBSCRIPTION_TYPES: tuple[str, ...] = typing.get_args(SubscriptionType)
ORDERED_TYPES = frozenset({"key_shared", "failover", "exclusive"})
#: Seconds a handler call may run before it counts as failed (twice the default drain timeout).
DEFAULT_TIMEOUT = 60.0

F = TypeVar("F", bound=Callable[..., Any])
Background = Callable[[Publisher], Coroutine[Any, Any, None]]
B = TypeVar("B", bound=Background)
#: An async context manager function of the bus: entered before the first message, exited after the drain.
Lifespan = Callable[[Publisher], contextlib.AbstractAsyncContextManager[Any]]
L = TypeVar("L", bound=Callable[..., Any])


class SubscribeOptions(TypedDict, total=False):
    """How a handler consumes: the keyword arguments of `subscribe` (see there)."""

    subscription_type: SubscriptionType
    concurrency: int
    max_retries: int
    retry_backoff: float
    retry_backoff_max: float
    dead_letter: bool
    initial_position: InitialPosition
    timeout: float | None
    reject_on: tuple[type[BaseException], ...]
    returns_to: str | None
    batch: Batch | None
    effectively_once: bool


@dataclass(frozen=True)
class Batch:
    """A batch subscription: the handler gets up to `max_messages` payloads at once (one per key on ordered
    subscriptions), waiting at most `max_wait` seconds after the first for more."""

    max_messages: int = 100
    max_wait: float = 0.1

    def __post_init__(self) -> None:
        if not _is_int(self.max_messages) or self.max_messages < 1:
            raise ValueError(f"Batch(max_messages={self.max_messages!r}): it must be an int >= 1")
        if not _is_num(self.max_wait) or self.max_wait < 0:
            raise ValueError(f"Batch(max_wait={self.max_wait!r}): it must be seconds >= 0")


@dataclass(frozen=True)
class Subscription:
    """One registered handler and how it consumes; checks itself when made (`ValueError` naming the fix)."""

    topic: str
    group: str
    handler: Handler
    subscription_type: SubscriptionType = "key_shared"
    concurrency: int = 1
    max_retries: int = 3
    retry_backoff: float = 0.5
    retry_backoff_max: float = 30.0
    dead_letter: bool = True
    initial_position: InitialPosition = "latest"
    timeout: float | None = DEFAULT_TIMEOUT
    reject_on: tuple[type[BaseException], ...] = ()
    #: The topic a handler's return value is published to (None: nowhere; a request's reply still goes back).
    returns_to: str | None = None
    #: Handle many messages per call (see `Batch`); None: one at a time.
    batch: Batch | None = None
    #: Store each output of a message once however often its handler runs (broker deduplication; see `subscribe`).
    effectively_once: bool = False
    #: Its router's middleware, around each attempt (after the bus's).
    middleware: tuple[object, ...] = ()

    def __post_init__(self) -> None:
        where = self.handler.where
        for ok, problem in _problems(self):
            if not ok:
                raise ValueError(f"{where}: {problem}")
        object.__setattr__(self, "retry_backoff", float(self.retry_backoff))
        object.__setattr__(self, "retry_backoff_max", float(self.retry_backoff_max))
        if self.timeout is not None:
            object.__setattr__(self, "timeout", float(self.timeout))

    @property
    def name(self) -> str:
        return self.handler.name

    @property
    def ordered(self) -> bool:
        """Whether messages of one key are handled one at a time, in order."""
        return self.subscription_type in ORDERED_TYPES

    def dead_letter_topic(self, full_topic: str) -> str:
        return dead_letter_topic(full_topic, self.group)

    def retry_topic(self, full_topic: str) -> str:
        return retry_topic(full_topic, self.group)


def _problems(sub: Subscription) -> list[tuple[bool, str]]:
    """Each check of a subscription's options, with what to write instead."""
    topic, backoff, timeout, reject_on = sub.topic, sub.retry_backoff, sub.timeout, sub.reject_on
    problem = topic_problem(topic) if isinstance(topic, str) else None
    returns_to = sub.returns_to
    output = topic_problem(returns_to) if isinstance(returns_to, str) else None
    return [
        (sub.batch is None or isinstance(sub.batch, Batch), f"batch={sub.batch!r} must be Batch(max_messages=..., max_wait=...)"),
        (
            sub.batch is None or returns_to is None,
            "returns_to is for handlers of one message: a batch handler publishes what it makes itself",
        ),
        (
            returns_to is None or (isinstance(returns_to, str) and output is None),
            f"returns_to={returns_to!r} must be a topic name ({output})" if output else
            f"returns_to={returns_to!r} must be a topic name, or None",
        ),
        (isinstance(topic, str), f"topic must be a string, not {type(topic).__name__}"),
        (problem is None, str(problem)),
        (isinstance(sub.group, str) and bool(sub.group.strip()), "group must be a non-empty string"),
        (
            sub.subscription_type in SUBSCRIPTION_TYPES,
            f"subscription_type={sub.subscription_type!r} is not one of {', '.join(SUBSCRIPTION_TYPES)}",
        ),
        (_is_int(sub.concurrency) and sub.concurrency >= 1, f"concurrency={sub.concurrency!r} must be an int >= 1"),
        (_is_int(sub.max_retries) and sub.max_retries >= 0, f"max_retries={sub.max_retries!r} must be an int >= 0"),
        (_is_num(backoff) and backoff >= 0, f"retry_backoff={backoff!r} must be seconds >= 0"),
        (
            _is_num(sub.retry_backoff_max) and _is_num(backoff) and sub.retry_backoff_max >= backoff,
            f"retry_backoff_max={sub.retry_backoff_max!r} must be seconds >= retry_backoff",
        ),
        (isinstance(sub.dead_letter, bool), f"dead_letter={sub.dead_letter!r} must be True or False"),
        *_once_problems(sub),
        (
            sub.initial_position in ("latest", "earliest"),
            f"initial_position={sub.initial_position!r} must be 'latest' or 'earliest'",
        ),
        (
            timeout is None or (_is_num(timeout) and timeout > 0),
            f"timeout={timeout!r} must be seconds > 0, or None for no limit",
        ),
        (
            isinstance(reject_on, tuple) and all(isinstance(t, type) and issubclass(t, BaseException) for t in reject_on),
            f"reject_on={reject_on!r} must be a tuple of exception types, e.g. (ValueError,)",
        ),
    ]


def _once_problems(sub: Subscription) -> list[tuple[bool, str]]:
    once = sub.effectively_once
    return [
        (isinstance(once, bool), f"effectively_once={once!r} must be True or False"),
        (
            once is not True or sub.subscription_type != "shared",
            "effectively_once=True needs an ordered subscription (key_shared, failover or exclusive): 'shared' hands "
            "one key's messages to several members at once, so their outputs cannot share one producer's order",
        ),
        (once is not True or sub.batch is None, "effectively_once=True is for handlers of one message, not batch="),
    ]


@dataclass(frozen=True)
class Publication:
    """A topic the app publishes to and the payload type it sends there (`Router.publisher`)."""

    topic: str
    payload_type: Any
    description: str | None = None

    def check(self, payload: Any) -> None:
        """Raise `TypeError` naming the declared type when `payload` is not one."""
        expected = self.payload_type
        if isinstance(expected, type) and not isinstance(payload, expected):
            raise TypeError(
                f"publish to {self.topic!r}: the app declares {expected.__qualname__} payloads there "
                f"(Router.publisher), not {type(payload).__qualname__}: pass {expected.__qualname__}(...) instead"
            )


def _check(where: str, ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {problem}")


class Router:
    """A registry of handlers; `EventBus(routers=[...])` runs them.

    >>> router = Router()
    >>> @router.subscribe("orders", "billing", concurrency=8)
    ... async def charge(order: Order, bus: EventBus) -> None:
    ...     await bus.publish("invoices", Invoice.for_order(order), key=order.id)
    """

    def __init__(self, *, middleware: Sequence[object] = ()) -> None:
        """`middleware`: around each attempt of this router's handlers (inside the bus's), and around every publish
        (see `eventbus.middleware`)."""
        self.middleware = checked(middleware, "Router(middleware=...)")
        self.subscriptions: list[Subscription] = []
        self.background: list[Background] = []
        self.publications: list[Publication] = []
        self.lifespans: list[Lifespan] = []

    def subscribe(self, topic: str, group: str, **options: Unpack[SubscribeOptions]) -> Callable[[F], F]:
        """Register the decorated function as the handler of `group` on `topic`.

        Messages are acknowledged after the handler returns; when it raises
        (anything, `CancelledError` and `SystemExit` included) or runs longer than
        `timeout` seconds (default 60; None: no limit), they are retried `max_retries`
        (3) times with exponential backoff starting at `retry_backoff` (0.5) seconds,
        capped at `retry_backoff_max` (30), then sent to the dead-letter topic
        ``{topic}-{group}-DLQ`` unless `dead_letter` is False. A handler that
        raises `Reject`, or one of the exception types in `reject_on`, skips the
        retries: its message is dead-lettered at once (reason ``rejected``).
        `subscription_type` (key_shared), `concurrency` (1) and `initial_position`
        (latest) say how it consumes. With `returns_to`, what the handler returns (not None)
        is published there, keyed as its message, and the message is acknowledged only once
        the broker stored it; a request's reply (`EventBus.request`) goes back either way.
        `effectively_once=True` (ordered subscriptions, on a namespace with deduplication): what
        the handler publishes, returns or replies is stored once however often it runs for one
        message; the n-th output of a rerun is taken as the n-th of the first run.
        """
        known = list(SubscribeOptions.__annotations__)
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]}?" if close else f"the options are {', '.join(known)}"
                raise TypeError(f"@subscribe({topic!r}, {group!r}): unexpected keyword argument {name!r} ({hint})")

        def register(handler: F) -> F:
            where = f"@subscribe({topic!r}, {group!r}) on {handler_name(handler)}"
            if not callable(handler):
                raise TypeError(f"{where}: the handler is not callable ({type(handler).__name__})")
            for existing in self.subscriptions:
                if (existing.topic, existing.group) == (topic, group):
                    raise ValueError(
                        f"{where}: group {group!r} on {topic!r} already has a handler ({existing.name}); "
                        "use another group name, or one handler per group"
                    )
            wrapped = Handler(handler, where, batch="batch" in options and options["batch"] is not None)
            self.subscriptions.append(Subscription(topic, group, wrapped, **options, middleware=self.middleware))
            return handler

        return register

    def publisher(self, topic: str, payload_type: Any, *, description: str | None = None) -> Publication:
        """Declare that the app publishes `payload_type` payloads to `topic`.

        `eventbus docs` lists it as a send operation with the payload's schema, and
        a bus running this router refuses (`TypeError`, before sending) a payload
        of another type on that topic.

        >>> router.publisher("invoices", Invoice, description="one per charged order")
        """
        where = f"publisher({topic!r}, ...)"
        _check(where, isinstance(topic, str), f"topic must be a string, not {type(topic).__name__}")
        problem = topic_problem(topic)
        _check(where, problem is None, str(problem))
        _check(
            where,
            isinstance(payload_type, type) and payload_type is not type(None),
            f"payload_type={payload_type!r} must be a class: a pydantic model, a dataclass, dict, list, str or bytes",
        )
        if payload_type not in (bytes, str, dict, list):
            try:
                decoder_for(payload_type)
            except TypeError as exc:
                raise TypeError(f"{where}: {exc}") from None
        for existing in self.publications:
            if existing.topic == topic:
                _check(
                    where,
                    existing.payload_type is payload_type,
                    f"{topic!r} is already declared with {existing.payload_type.__qualname__} payloads",
                )
                return existing
        publication = Publication(topic, payload_type, description)
        self.publications.append(publication)
        return publication

    def lifespan(self, func: L) -> L:
        """Register a lifespan: an async context manager function of the bus, for resources the handlers use.

        >>> @router.lifespan
        ... @asynccontextmanager
        ... async def database(bus: EventBus) -> AsyncIterator[None]:
        ...     await db.open()
        ...     yield
        ...     await db.close()

        `EventBus.run()` enters it after connecting and before the first message (`/readyz` stays down until
        then) and exits it after the drain, once every handler has finished and been acknowledged. Several
        enter in order of registration and exit in reverse; one that raises on entry stops the worker
        before anything is consumed.
        """
        self.lifespans.append(lifespan_of(func, f"lifespan {handler_name(func)}"))
        return func

    def run_in_background(self, func: B) -> B:
        """Run ``async def func(bus)`` beside the handlers while `EventBus.run()` runs.

        It is cancelled at shutdown after in-flight handlers drained, before the lifespans exit.
        """
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"{handler_name(func)}: run_in_background takes an async function of one argument (the bus)")
        self.background.append(func)
        return func


def subscriptions_of(routers: Sequence[Router], topic_of: Callable[[str], str]) -> list[tuple[str, Subscription]]:
    """Every subscription of the routers with its full topic name; `ConfigError` for a group handled twice."""
    seen: dict[tuple[str, str], Subscription] = {}
    out = []
    for router in routers:
        for sub in router.subscriptions:
            full = topic_of(sub.topic)
            other = seen.get((full, sub.group))
            if other is not None:
                raise ConfigError(f"group {sub.group!r} on {full} has two handlers: {other.name} and {sub.name}")
            seen[(full, sub.group)] = sub
            out.append((full, sub))
    return out


def lifespan_of(func: Callable[..., Any], where: str) -> Lifespan:
    """A lifespan as registered: an async context manager function, or an async generator function (wrapped)."""
    if inspect.isasyncgenfunction(func):
        return contextlib.asynccontextmanager(func)
    if not callable(func) or inspect.iscoroutinefunction(func) or inspect.isgeneratorfunction(func):
        raise TypeError(
            f"{where}: a lifespan is an async context manager function of the bus: write "
            "`@asynccontextmanager async def lifespan(bus): ...; yield; ...`"
        )
    return typing.cast(Lifespan, func)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: The registry `subscribe` writes to; `EventBus()` runs it when no routers are given.
default_router = Router()


#: Register a handler in the default registry (`Router.subscribe` of `default_router`).
#:
#: >>> @subscribe("orders", "billing")
#: ... async def charge(order: Order) -> None: ...
subscribe = default_router.subscribe

#: Declare a topic the app publishes to, in the default registry (`Router.publisher` of `default_router`).
#:
#: >>> publisher("invoices", Invoice)
publisher = default_router.publisher


def declared_schemas(routers: Sequence[Router], full_name: Callable[[str], str]) -> dict[str, PayloadSchema]:
    """The schema each topic's producer registers, by full topic name; a WARNING says why a typed topic has none.

    A topic gets the schema of the pydantic model the app declares it sends there: `Router.publisher`, or a
    `returns_to` handler's return annotation (`Model` or `Model | None`). Untyped topics (dict, str, bytes, no
    declaration) stay schemaless; a topic declared with two types, or with a model Avro cannot describe, too.
    """
    declared: dict[str, set[Any]] = {}
    for router in routers:
        for publication in router.publications:
            declared.setdefault(full_name(publication.topic), set()).add(publication.payload_type)
        for sub in router.subscriptions:
            if sub.returns_to is not None:
                declared.setdefault(full_name(sub.returns_to), set()).add(_without_none(sub.handler.return_type))
    schemas: dict[str, PayloadSchema] = {}
    problems: list[str] = []
    for topic, types in declared.items():
        models = [t for t in types if isinstance(t, type) and issubclass(t, BaseModel)]
        if not models:
            continue
        if len(types) > 1:
            names = ", ".join(sorted(getattr(t, "__qualname__", str(t)) for t in types))
            problems.append(f"{topic} is declared with {names}: no schema registered there (declare one model per topic)")
            continue
        try:
            schemas[topic] = json_schema_of(models[0])
        except SchemaUnsupported as exc:
            problems.append(
                f"{topic}: {models[0].__qualname__} has no Avro form ({exc}): no schema registered there, "
                "so Java and Go consumers with a schema cannot subscribe"
            )
    for problem in problems:
        log.warning("%s", problem)
    return schemas


def _without_none(annotation: Any) -> Any:
    """`Model | None` (a handler that may publish nothing) is `Model`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(annotation) else annotation
