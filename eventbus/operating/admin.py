"""Each subscription's backlog, unacknowledged messages, consumers and rates, from Apache Pulsar's admin REST API."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from ..broker.embedded import stored_topics
from ..errors import ConfigError, EventBusError
from ..schemas import PayloadSchema
from ..settings import Settings, admin_urls, redacted
from ..topics import REPLAY_SUBSCRIPTION, dead_letter_topic

#: Where the test kit's and compose's Pulsar serve the admin API beside the broker's 6650.
_REDIRECTS_MAX = 5


def _path(topic: str) -> str:
    """The admin API's path of a full topic name."""
    return "/admin/v2/" + quote(topic.replace("://", "/"), safe="/")


def _reason(response: httpx.Response) -> str | None:
    """Pulsar's reason in an error's JSON body (None: not Pulsar's answer)."""
    try:
        body = response.json()
    except ValueError:
        return None
    reason = body.get("reason") if isinstance(body, dict) else None
    return str(reason) if reason is not None else None


@dataclass(frozen=True)
class SchemaCheck:
    """A declared model against the broker's registry: what is registered, and whether the model may follow it."""

    topic: str
    model: str
    registered: str
    same: bool
    compatible: bool
    strategy: str


def _same(held: object, definition: str) -> bool:
    """Whether a registered definition is this one (compared as JSON: the broker reformats it)."""
    try:
        return isinstance(held, str) and orjson.loads(held) == orjson.loads(definition)
    except orjson.JSONDecodeError:
        return False


@dataclass(frozen=True)
class SubscriptionStatus:
    """One group on one topic, as the broker counts it (partitions summed)."""

    topic: str
    group: str
    subscription_type: str
    backlog: int
    unacked: int
    consumers: int
    rate_in: float
    rate_out: float
    #: Bytes stored on the group's dead-letter topic (0: none), and how many of them no replay has sent back.
    dead_letter_bytes: int
    dead_letters_not_replayed: int | None
    #: The brokers that own the topic (or its partitions) now: the one whose log and metrics to read.
    owners: list[str]


def _where(url: httpx.URL) -> str:
    """host:port of a URL (the scheme's port when it names none), without any user or password."""
    port = url.port or (443 if url.scheme == "https" else 80)
    return f"{url.host}:{port}"


def redirect_problem(source: httpx.URL, target: httpx.URL, allowed: set[str]) -> str | None:
    """Why a redirect from `source` to `target` must not carry the admin token, or None when it may."""
    if source.scheme == "https" and target.scheme != "https":
        return f"from https to {target.scheme}://{_where(target)}: the token is never sent in clear"
    if _where(target) not in allowed:
        return (
            f"to {_where(target)}, which is not a host of EVENTBUS_ADMIN_URL ({', '.join(sorted(allowed))}): the "
            "token goes only there; add that broker's admin URL if it is yours"
        )
    return None


class Admin:
    """A small client of the admin API; every failure is one `EventBusError` line naming the fix."""

    def __init__(self, settings: Settings, timeout: float = 10.0) -> None:
        #: A cluster's brokers each serve the API: the first that answers does.
        self.bases = list(dict.fromkeys(admin_urls(settings)))
        self.base = self.bases[0]
        verify: Any = str(settings.tls_trust_certs_file) if settings.tls_trust_certs_file else True
        self._http = httpx.Client(headers=settings.admin_headers(), timeout=timeout, verify=verify)
        self._allowed = {_where(httpx.URL(base)) for base in self.bases}

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, missing: str, body: Any = None) -> Any:
        """GET a JSON document (POST `body`, when given); `missing` is the error for Pulsar's 404 (its reason added)."""
        return self._document(self._follow(path, body), path, missing)

    def _document(self, response: httpx.Response, path: str, missing: str) -> Any:
        """The answer's JSON, or one error naming the fix."""
        if response.status_code in (401, 403):
            raise ConfigError(
                f"the admin API at {redacted(self.base)} refused the request (HTTP {response.status_code}): set "
                "EVENTBUS_ADMIN_TOKEN (or EVENTBUS_TOKEN) to a token with admin rights on the tenant"
            )
        if response.status_code == 404:
            reason = _reason(response)
            if reason is None:  # not Pulsar's answer: a web server's page for a path it does not serve
                raise ConfigError(
                    f"the admin API at {redacted(self.base)} does not serve {path} (HTTP 404 without Pulsar's reason): "
                    "set EVENTBUS_ADMIN_URL to the admin API's root, e.g. http://broker:8080"
                )
            raise ConfigError(f"{missing} ({reason})")
        if response.status_code >= 400:
            raise EventBusError(f"the admin API answered HTTP {response.status_code} for {path}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError:
            raise EventBusError(
                f"the admin API at {redacted(self.base)} answered {path} with HTTP {response.status_code} and no JSON "
                f"({response.text[:80]!r}): is EVENTBUS_ADMIN_URL Apache Pulsar's admin API?"
            ) from None

    def _follow(self, path: str, body: Any = None) -> httpx.Response:
        """GET `path` (POST `body`), following redirects with the token kept, to the configured admin hosts only.

        A broker that does not own a topic answers its stats with a redirect (HTTP 307) to the one that
        does, often on another host or port, where httpx's own following drops the Authorization header.
        The token follows only to a host and port of EVENTBUS_ADMIN_URL, never from https to http: anything
        else is an error naming both ends (the token went wherever an admin endpoint pointed, in clear too).
        """
        url = path
        for _ in range(_REDIRECTS_MAX):
            response = self._get(url, body)
            location = response.headers.get("location")
            if not response.is_redirect or not location:
                return response
            target = response.url.join(location)
            problem = redirect_problem(response.url, target, self._allowed)
            if problem:
                raise EventBusError(f"the admin API at {_where(response.url)} redirected {path} {problem}")
            url = str(target)
        raise EventBusError(f"the admin API redirected {path} more than {_REDIRECTS_MAX} times: last to {url}")

    def _get(self, url: str, body: Any = None) -> httpx.Response:
        """GET (POST `body`) from the first of the admin URLs that answers (a redirect's absolute URL as it is)."""
        bases = [""] if "://" in url else self.bases
        problems = []
        for base in bases:
            try:
                if body is not None:
                    return self._http.post(base + url, json=body)
                return self._http.get(base + url)
            except httpx.HTTPError as exc:
                problems.append(f"at {redacted(base or url)} ({redacted(f'{type(exc).__name__}: {exc}')})")
        raise EventBusError(f"cannot reach the admin API {'; '.join(problems)}: is EVENTBUS_ADMIN_URL right?") from None

    def owners(self, topic: str, partitions: int) -> list[str]:
        """The brokers (service URLs) that own the topic, or its partitions, now."""
        names = [f"{topic}-partition-{i}" for i in range(partitions)] if partitions else [topic]
        found = []
        for name in names:
            answer = self.get("/lookup/v2/topic/" + quote(name.replace("://", "/"), safe="/"), f"no owner for {name}")
            found.append(str(answer.get("brokerUrl", "?")))
        return sorted(set(found))

    def partitions(self, topic: str) -> int:
        """The topic's partitions (0: not partitioned); a topic that does not exist names its neighbours."""
        missing = f"topic {topic} does not exist on {redacted(self.base)}"
        try:
            return int(self.get(f"{_path(topic)}/partitions", missing).get("partitions", 0))
        except ConfigError as exc:
            if str(exc).startswith(missing):
                raise ConfigError(f"{exc}: {self._neighbours(topic)}") from None
            raise

    def topic_stats(self, topic: str) -> dict[str, Any]:
        """The topic's stats (a partitioned topic's summed over its partitions)."""
        partitions = self.partitions(topic)
        path = _path(topic) + ("/partitioned-stats" if partitions else "/stats")
        stats: dict[str, Any] = self.get(path, f"topic {topic} does not exist on {redacted(self.base)}")
        return stats

    def topics(self, namespace: str) -> list[str]:
        """The persistent topics of `namespace` ("tenant/namespace"), partitions as their partitioned topic."""
        found = self.get(f"/admin/v2/persistent/{quote(namespace)}", f"namespace {namespace} does not exist")
        return sorted({re.sub(r"-partition-\d+$", "", t) for t in found})

    def _neighbours(self, topic: str) -> str:
        """What exists beside a topic that does not: its namespace's topics, the closest first."""
        namespace = topic.split("://", 1)[-1].rsplit("/", 1)[0]
        try:
            names = self.topics(namespace)
        except ConfigError:
            return f"namespace {namespace} does not exist: check EVENTBUS_TENANT and EVENTBUS_NAMESPACE"
        if not names:
            return f"{namespace} has no topics: check the topic name, EVENTBUS_TENANT and EVENTBUS_NAMESPACE"
        closest = difflib.get_close_matches(topic, names, n=5, cutoff=0) or names[:5]
        more = f" and {len(names) - len(closest)} more" if len(names) > len(closest) else ""
        return f"{namespace} has {', '.join(closest)}{more}"

    def schema_check(self, topic: str, schema: PayloadSchema) -> SchemaCheck:
        """What the registry holds for `topic`, and whether it would take `schema` (its compatibility check)."""
        path = "/admin/v2/schemas/" + quote(topic.split("://", 1)[-1], safe="/")
        try:
            held = self.get(f"{path}/schema", f"no schema on {topic}")
        except ConfigError as exc:
            if "no schema on" not in str(exc):
                raise
            held = None
        registered = f"{held.get('type', '?')} v{held.get('version', '?')}" if held else "none"
        same = bool(held) and held.get("type") == schema.kind and _same(held.get("data"), schema.definition)
        body = {"type": schema.kind, "schema": schema.definition, "properties": {}}
        refused = self._follow(f"{path}/compatibility", body)
        reason = _reason(refused) or ""
        if refused.status_code >= 400 and "compatibility check" in reason:  # Pulsar 4.0 answers a refusal with HTTP 500
            strategy = re.search(r"strategy (\w+)", reason)
            return SchemaCheck(topic, schema.name, registered, same, False, strategy.group(1) if strategy else "?")
        answer = self._document(refused, f"{path}/compatibility", f"cannot check a schema for {topic}")
        compatible = bool(answer.get("compatibility", answer.get("isCompatibility", False)))
        return SchemaCheck(topic, schema.name, registered, same, compatible, str(answer.get("schemaCompatibilityStrategy", "?")))

    def status(self, topic: str, group: str) -> SubscriptionStatus:
        stats = self.topic_stats(topic)
        subscription = stats.get("subscriptions", {}).get(group)
        if subscription is None:
            known = ", ".join(sorted(stats.get("subscriptions", {}))) or "none"
            raise ConfigError(f"group {group!r} has no subscription on {topic} (its groups: {known})")
        dead_bytes, not_replayed = 0, None
        try:
            dead = self.topic_stats(dead_letter_topic(topic, group))
        except ConfigError:
            pass  # nothing was ever dead-lettered
        else:
            dead_bytes = int(dead.get("storageSize", 0))
            replay = dead.get("subscriptions", {}).get(REPLAY_SUBSCRIPTION)
            not_replayed = int(replay.get("msgBacklog", 0)) if replay is not None else None
        return SubscriptionStatus(
            topic=topic,
            group=group,
            subscription_type=str(subscription.get("type", "?")),
            backlog=int(subscription.get("msgBacklog", 0)),
            unacked=int(subscription.get("unackedMessages", 0)),
            consumers=len(subscription.get("consumers", [])),
            rate_in=float(stats.get("msgRateIn", 0.0)),
            rate_out=float(subscription.get("msgRateOut", 0.0)),
            dead_letter_bytes=dead_bytes,
            dead_letters_not_replayed=not_replayed,
            owners=self.owners(topic, self.partitions(topic)),
        )


def namespace_topics(settings: Settings) -> list[str] | None:
    """The topics of the configured namespace, asked without creating any (None: this broker cannot tell).

    The embedded broker's from its data directory; Apache Pulsar's from the admin API (a lookup through the
    client would create the topic it looks up).
    """
    namespace = f"{settings.tenant}/{settings.namespace}"
    if settings.uses_embedded:
        return stored_topics(settings.data_dir, settings.tenant, settings.namespace)
    api = Admin(settings)
    try:
        return api.topics(namespace)
    finally:
        api.close()


def check_dead_letters(settings: Settings, topic: str, group: str, known: list[str] | None) -> None:
    """Raise `ConfigError` naming what exists unless `group` has a dead-letter topic on `topic` among `known`."""
    full = settings.topic(topic)
    dead = dead_letter_topic(full, group)
    if known is None or dead in known:
        return
    if full not in known:
        others = difflib.get_close_matches(full, [t for t in known if not t.endswith(("-DLQ", "-RETRY"))], n=5, cutoff=0)
        where = f"its namespace has {', '.join(others)}" if others else "its namespace has no topics"
        raise ConfigError(f"topic {full} does not exist ({where}): check the topic, EVENTBUS_TENANT and EVENTBUS_NAMESPACE")
    groups = sorted(t[len(full) + 1 : -len("-DLQ")] for t in known if t.startswith(full + "-") and t.endswith("-DLQ"))
    raise ConfigError(
        f"group {group!r} never dead-lettered on {full} (no topic {dead}); groups with dead letters there: "
        f"{', '.join(repr(g) for g in groups) or 'none'}"
    )
