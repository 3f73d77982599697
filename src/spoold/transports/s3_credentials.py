"""S3 clients, and credentials from a systemd credential, for `ship: {credential: NAME}`.

The file `$CREDENTIALS_DIRECTORY/NAME` (systemd `LoadCredential=`) holds either
one line `ACCESS_KEY_ID:SECRET_KEY` (optionally `:SESSION_TOKEN`) or an AWS
shared-credentials ini (its `[default]` section, else the first one). Without
`credential` boto3's usual chain applies (environment, shared files, instance
role). The secret and token are registered with `spoold.redact` as soon as read.
"""

from __future__ import annotations

import configparser
from collections.abc import Mapping
from typing import Any

import boto3
import botocore.config

from spoold.errors import PermanentError
from spoold.redact import register_secret
from spoold.transports.base import credential_path


def session_credentials(name: str | None) -> dict[str, str]:
    """Session keyword arguments from a systemd credential, or none (boto3's own chain)."""
    if not name:
        return {}
    path = credential_path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PermanentError(f"credential {name!r}: cannot read {path}: {exc.strerror}") from None
    if "aws_access_key_id" in text.lower():
        parser = configparser.ConfigParser()
        try:
            parser.read_string(text)
        except configparser.Error:
            raise PermanentError(f"credential {name!r}: not a valid shared-credentials file") from None
        sections = parser.sections()
        section = parser["default"] if "default" in sections else parser[sections[0]] if sections else None
        values = [section.get(k, "") if section else "" for k in
                  ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")]  # fmt: skip
    else:
        values = [*text.strip().split(":", 2), "", ""][:3]
    key_id, secret, token = (v.strip() for v in values)
    if not key_id or not secret:
        raise PermanentError(f"credential {name!r}: expected ACCESS_KEY_ID:SECRET_KEY or an AWS credentials file")
    for value in (secret, token):
        if value:
            register_secret(value)
    found = {"aws_access_key_id": key_id, "aws_secret_access_key": secret}
    if token:
        found["aws_session_token"] = token
    return found


def s3_client(settings: Mapping[str, Any], pool: int, read_timeout: float = 120) -> Any:
    """A boto3 S3 client for a step's or a queue's settings (`endpoint_url`, `region`, `credential`, ...)."""
    config = botocore.config.Config(
        connect_timeout=float(settings.get("connect_timeout") or 30),
        read_timeout=float(settings.get("read_timeout") or read_timeout),
        max_pool_connections=pool, retries={"max_attempts": 3, "mode": "standard"},
    )  # fmt: skip
    session = boto3.session.Session(**session_credentials(settings.get("credential")))
    return session.client("s3", endpoint_url=settings.get("endpoint_url") or None,
                          region_name=settings.get("region") or None, config=config)  # fmt: skip
