"""The few admin REST calls the real-Pulsar tests need."""

from __future__ import annotations

import json
import urllib.request


def admin(pulsar: dict, method: str, path: str, body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(pulsar["admin_url"] + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {pulsar['admin_token']}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read().decode()
        return json.loads(text) if text else None
