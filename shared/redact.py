"""Secrets never leave the process: redaction for anything printed, logged or written.

A secret is the value of an environment variable named ``WANDB_API_KEY``, ``*_API_KEY``, ``*_TOKEN``,
``*_SECRET`` or ``*_PASSWORD``, or a config value whose key ends in ``api_key`` (or ``secret``,
``password``).  Use :func:`redact_text` on text that is about to be printed or written,
:func:`redact_config` on a config dict (e.g. W&B's run config), :func:`redact_toml` for the resolved
config file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[REDACTED]"
SECRET_ENV = re.compile(r"^(WANDB_API_KEY|.*_API_KEY|.*_TOKEN|.*_SECRET|.*_PASSWORD)$", re.IGNORECASE)
SECRET_KEY = re.compile(r"(api_key|apikey|secret|password)$", re.IGNORECASE)
MIN_SECRET_LEN = 8  # shorter values ("0", "true") would redact ordinary text everywhere


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables, longest first."""
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if SECRET_ENV.match(k) and len(v.strip()) >= MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    for value in secret_values(environ):
        text = text.replace(value, REDACTED)
    return text


def redact_config(data: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of ``data`` (dicts/lists/scalars) with secret keys' values and secret env values replaced."""
    if isinstance(data, dict):
        return {
            k: (REDACTED if isinstance(k, str) and SECRET_KEY.search(k) and v not in ("", None)
                else redact_config(v, environ))
            for k, v in data.items()
        }
    if isinstance(data, (list, tuple)):
        return [redact_config(v, environ) for v in data]
    if isinstance(data, str):
        return redact_text(data, environ)
    return data


def redact_toml(toml_text: str) -> str:
    """``toml_text`` (e.g. ``shared.config.to_toml(cfg)``, the resolved config) with every secret redacted.

    Takes the text rather than the config so that this module imports nothing of the project's: the
    config imports :data:`SECRET_ENV` from here, and an import back would be a circle."""
    import tomli
    import tomli_w

    return tomli_w.dumps(redact_config(tomli.loads(toml_text)))
