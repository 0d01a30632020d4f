"""The few admin REST calls the real-Pulsar tests need."""

from __future__ import annotations

import httpx


def admin(pulsar: dict, method: str, path: str, body: object = None) -> object:
    """One call as the superuser; a cluster broker's redirect to a topic's owner is followed with the token kept
    (httpx, like urllib, drops the Authorization header on a redirect to another port)."""
    url = pulsar["admin_url"] + path
    headers = {"Authorization": f"Bearer {pulsar['admin_token']}"}
    for _ in range(5):
        answer = httpx.request(method, url, headers=headers, json=body, timeout=30)
        if not answer.is_redirect:
            break
        url = str(answer.url.join(answer.headers["location"]))
    answer.raise_for_status()
    return answer.json() if answer.content else None
