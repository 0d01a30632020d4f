"""The admin client against stub HTTP servers: redirects to the owning broker keep the token; odd answers are named."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eventbus import ConfigError, EventBusError, Settings
from eventbus.operating.admin import Admin

TOPIC = "persistent://public/default/orders"
STATS = {"msgRateIn": 1.5, "subscriptions": {"billing": {"type": "Shared", "msgBacklog": 7, "consumers": [{}]}}}

Answer = Callable[[str, dict[str, str]], tuple[int, dict[str, str], bytes]]


@contextmanager
def serving(answer: Answer) -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    """An HTTP server on 127.0.0.1 answering GETs with `answer(path, headers)`; its URL and what it was asked."""
    asked: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            asked.append((self.path, self.headers.get("Authorization")))
            status, headers, body = answer(self.path, dict(self.headers))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def _json(status: int, body: object) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


def _admin(url: str) -> Admin:
    return Admin(Settings(_env_file=None, url="pulsar://127.0.0.1:6650", admin_url=url, admin_token="s3cret"))


def test_stats_from_a_broker_that_redirects_to_the_owner_on_another_port_keep_the_token() -> None:
    def owner(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if headers.get("Authorization") != "Bearer s3cret":
            return _json(401, {"reason": "no token"})
        if path.endswith("/partitions"):
            return _json(200, {"partitions": 0})
        if path.endswith("-billing-DLQ/stats"):
            return _json(404, {"reason": "Topic not found"})
        return _json(200, STATS)

    with serving(owner) as (owner_url, owner_asked):
        with serving(lambda path, _: (307, {"Location": owner_url + path}, b"")) as (other_url, other_asked):
            admin = _admin(f"{other_url},{owner_url}")  # a cluster's brokers, each configured
            try:
                status = admin.status(TOPIC, "billing")
            finally:
                admin.close()
    assert (status.backlog, status.consumers, status.subscription_type) == (7, 1, "Shared")
    assert other_asked and all(token == "Bearer s3cret" for _, token in other_asked + owner_asked)
    assert {path for path, _ in owner_asked} >= {"/admin/v2/persistent/public/default/orders/stats"}


def test_the_token_never_follows_a_redirect_to_a_host_not_configured() -> None:
    """An admin endpoint pointing elsewhere (another port of this very host, here) gets an error, not the token."""
    with serving(lambda path, _: _json(200, STATS)) as (elsewhere_url, elsewhere_asked):
        with serving(lambda path, _: (307, {"Location": elsewhere_url + path}, b"")) as (url, asked):
            admin = _admin(url)
            try:
                with pytest.raises(EventBusError) as refused:
                    admin.status(TOPIC, "billing")
            finally:
                admin.close()
    here, there = url.removeprefix("http://"), elsewhere_url.removeprefix("http://")
    assert f"the admin API at {here} redirected" in str(refused.value) and f"to {there}, which is not" in str(refused.value)
    assert asked and elsewhere_asked == [], "the other end was never asked, so never given the token"


def test_a_redirect_may_not_go_from_https_to_http_nor_anywhere_unconfigured() -> None:
    from httpx import URL

    from eventbus.operating.admin import redirect_problem

    allowed = {"b1:8443", "b2:8443", "b3:8080"}
    assert redirect_problem(URL("https://b1:8443/a"), URL("https://b2:8443/a"), allowed) is None
    assert "never sent in clear" in (redirect_problem(URL("https://b1:8443/a"), URL("http://b2:8443/a"), allowed) or "")
    assert redirect_problem(URL("http://b3:8080/a"), URL("http://b3:8080/b"), allowed) is None
    assert "not a host" in (redirect_problem(URL("https://b1:8443/a"), URL("https://b1:9443/a"), allowed) or "")
    assert "not a host" in (redirect_problem(URL("https://b1:8443/a"), URL("https://evil:8443/a"), allowed) or "")
    problem = redirect_problem(URL("https://b1:8443/a"), URL("https://user:pw@evil/a"), allowed) or ""
    assert "evil:443" in problem and "pw" not in problem


def test_a_redirect_loop_an_empty_body_and_a_wrong_path_are_named() -> None:
    with serving(lambda path, _: (307, {"Location": path}, b"")) as (url, _):
        with pytest.raises(EventBusError, match="redirected .* more than 5 times"):
            _admin(url).topic_stats(TOPIC)
    with serving(lambda path, _: (200, {}, b"")) as (url, _):
        with pytest.raises(EventBusError, match="no JSON .* is EVENTBUS_ADMIN_URL Apache Pulsar's admin API"):
            _admin(url).topic_stats(TOPIC)
    with serving(lambda path, _: (404, {"Content-Type": "text/html"}, b"<html>Not Found</html>")) as (url, _):
        with pytest.raises(ConfigError, match="does not serve .* set EVENTBUS_ADMIN_URL to the admin API's root"):
            _admin(url).topic_stats(TOPIC)


def test_a_topic_that_does_not_exist_is_named_with_what_does() -> None:
    def pulsar(path: str, _: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if path == "/admin/v2/persistent/public/default":
            return _json(200, [f"{TOPIC}s-partition-0", f"{TOPIC}s-partition-1", f"{TOPIC}-billing-DLQ"])
        return _json(404, {"reason": "Topic not found"})

    with serving(pulsar) as (url, _):
        with pytest.raises(ConfigError) as caught:
            _admin(url).topic_stats("persistent://public/default/order")
    assert str(caught.value) == (
        "topic persistent://public/default/order does not exist on "
        f"{url} (Topic not found): public/default has {TOPIC}s, {TOPIC}-billing-DLQ"
    )
