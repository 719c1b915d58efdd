"""Secrets out of everything hpcforge writes: W&B configs, checkpoints, store metadata, job records.

Kept apart from tracking.py so data preparation and jobs/ can use it without importing torch.
"""
from __future__ import annotations

import re
from typing import Any

SECRET_MARKERS = ("key", "token", "password", "secret")
# `export WANDB_API_KEY=...` in cluster.setup lines, `--token abc`, `password: x`
SECRET_IN_TEXT = re.compile(r"(?i)([\w.-]*(?:api[_-]?key|token|password|secret)[\w.-]*\s*[=:\s]\s*)(\S+)")


def redact(obj: Any) -> Any:
    """The config with secrets replaced: text under secret-looking keys (api_key, token, ...) and
    secret-looking assignments inside strings (setup lines such as `export WANDB_API_KEY=...`).
    Numbers stay: a field like `max_tokens: 64` is a setting, and the config must still load."""
    if isinstance(obj, dict):
        return {k: _hide(v) if any(m in str(k).lower() for m in SECRET_MARKERS) else redact(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return SECRET_IN_TEXT.sub(lambda m: m.group(1) + "***", obj)
    return obj


def _hide(value: Any) -> Any:
    """Every non-empty string inside a secret-named entry (a list of tokens as well as one)."""
    if isinstance(value, dict):
        return {k: _hide(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hide(v) for v in value]
    return "***" if isinstance(value, str) and value else value
