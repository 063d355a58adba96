"""The Kafka client properties a user adds to every client featureplane makes.

A production cluster (Amazon MSK, say) takes only TLS or SASL connections, so
each consumer, producer and admin client needs librdkafka properties beyond
the bootstrap servers: `security.protocol`, `sasl.*`, `ssl.*`. They come as
one JSON object in FEATUREPLANE_KAFKA_CONFIG, checked once when the settings
are read, so a mistake stops the start in one line naming the property:

- the text must be a JSON object whose values are strings, numbers or booleans;
- the properties featureplane sets itself because its guarantees rest on them
  (`RESERVED`: manual commits, the consumer groups, acks=all, ...) are refused,
  never silently overridden;
- librdkafka itself must accept every property and value (a client is built
  and dropped without connecting, which also loads the CA and key files named).

The values hold passwords: a `KafkaConfig` shows only its property names
(`describe` adds the values of the few that are never secret), and error
messages never show the value of a password, key, token or secret.

One property is featureplane's, not librdkafka's: `MSK_IAM` signs in to
Amazon MSK with AWS IAM (SASL/OAUTHBEARER, port 9098), with tokens that AWS's
aws-msk-iam-sasl-signer-python signs with the AWS credentials of the pod or
machine; `librdkafka()` turns it into librdkafka's token callback.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

__all__ = ["MSK_IAM", "RESERVED", "SHOWN", "KafkaConfig", "Value", "msk_iam_token"]

Value = str | int | float | bool
"""A property's value as JSON gives it; librdkafka reads each as text."""

_OFFSETS = "featureplane commits an offset only once its record is written or handed over"
_DELIVERY = "featureplane waits for the broker to confirm every record it hands over"

RESERVED: Final[Mapping[str, str]] = {
    "bootstrap.servers": "set it with FEATUREPLANE_KAFKA_BOOTSTRAP (--bootstrap)",
    "metadata.broker.list": "set the brokers with FEATUREPLANE_KAFKA_BOOTSTRAP (--bootstrap)",
    "group.id": "set with FEATUREPLANE_KAFKA_GROUP (--group) and --retry-group",
    "group.instance.id": "every consumer needs its own, and a process runs several",
    "enable.auto.commit": _OFFSETS,
    "enable.auto.offset.store": _OFFSETS,
    "auto.offset.reset": "a consumer group with no committed offset starts at the earliest record",
    "enable.partition.eof": "ingestion reads on at the end of a partition, a backfill stops there",
    "isolation.level": "only committed records of transactional producers are read",
    "session.timeout.ms": "set it with FEATUREPLANE_SESSION_TIMEOUT (--session-timeout)",
    "acks": _DELIVERY + " (acks=all)",
    "request.required.acks": _DELIVERY + " (acks=all)",
    "delivery.report.only.error": _DELIVERY,
    "enable.idempotence": "featureplane chooses it for each of its producers",
    "transactional.id": "featureplane's producers are not transactional",
    "message.max.bytes": "the producer is sized to the largest record the topics take, read "
    "from the cluster",
}
"""Properties featureplane sets itself, each with why it cannot be changed."""

_CALLBACKS = frozenset({"on_delivery", "on_commit", "logger"})

MSK_IAM: Final = "featureplane.aws_msk_iam"
"""`true` (the region from AWS_REGION, AWS_DEFAULT_REGION or the AWS config file) or an
AWS region: sign in to Amazon MSK with AWS IAM. Needs "security.protocol": "SASL_SSL" and
"sasl.mechanism": "OAUTHBEARER", and the package aws-msk-iam-sasl-signer-python."""

_SIGNER = "aws_msk_iam_sasl_signer"
_IAM_NEEDS = {"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"}

SHOWN: Final = frozenset({"security.protocol", "sasl.mechanism", "sasl.mechanisms", MSK_IAM})
"""Properties whose values `describe` shows: never secret, and what a reader of a
connection error needs first."""

_SECRET_HINTS = ("password", "secret", "token", "key", "jaas", "credential")


class KafkaConfig(Mapping[str, Value]):
    """librdkafka properties for every Kafka client, checked: see the module docstring.

    Built from a mapping or, as a setting, from the JSON text of FEATUREPLANE_KAFKA_CONFIG.
    A bad one raises ValueError with one line naming the property; nothing is quoted.
    """

    __slots__ = ("_props", "_region")

    def __init__(self, props: Mapping[str, object] | None = None) -> None:
        checked = _checked(props or {})
        self._region = _msk_iam_region(checked)
        theirs = {k: v for k, v in checked.items() if k != MSK_IAM}
        if theirs:
            _librdkafka_accepts(theirs)
        self._props: dict[str, Value] = checked

    def librdkafka(self) -> dict[str, Any]:
        """The properties as librdkafka takes them: `MSK_IAM` becomes its token callback."""
        props: dict[str, Any] = {k: v for k, v in self._props.items() if k != MSK_IAM}
        if self._region is not None:
            props["oauth_cb"] = msk_iam_token(self._region)
        return props

    @classmethod
    def parse(cls, text: str) -> KafkaConfig:
        """From the JSON text of the variable; blank is no properties."""
        if not text.strip():
            return cls()
        try:
            value = json.loads(text)
        except ValueError as exc:  # the decoder's message gives the place, never the text
            raise ValueError(f"not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise ValueError(
                "must be a JSON object of librdkafka properties, like "
                f'{{"security.protocol": "SSL"}}, not {_json_kind(value)}'
            )
        return cls(value)

    def __getitem__(self, key: str) -> Value:
        return self._props[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._props)

    def __len__(self) -> int:
        return len(self._props)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._props.items())))

    def __repr__(self) -> str:
        return f"KafkaConfig({', '.join(self._props)})"  # names only: values hold secrets

    def describe(self) -> str:
        """The property names, with the values of `SHOWN` ones: what a log line may say."""
        return ", ".join(f"{k}={v}" if k in SHOWN else k for k, v in self._props.items())

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(dict),
        )

    @classmethod
    def _validate(cls, value: object) -> KafkaConfig:
        if isinstance(value, KafkaConfig):
            return value
        if isinstance(value, str | bytes):
            return cls.parse(value.decode() if isinstance(value, bytes) else value)
        if isinstance(value, Mapping):
            return cls(value)
        raise ValueError(f"must be a JSON object of librdkafka properties, not {type(value)}")


def _checked(props: Mapping[Any, object]) -> dict[str, Value]:
    out: dict[str, Value] = {}
    problems: list[str] = []
    for key, value in props.items():
        name = str(key).strip()
        if not name:
            problems.append("a property with an empty name")
        elif name in RESERVED:
            problems.append(f'"{name}" cannot be set here: {RESERVED[name]}')
        elif name.startswith("featureplane.") and name != MSK_IAM:
            problems.append(f'"{name}" is not a featureplane property (only "{MSK_IAM}" is)')
        elif name.endswith("_cb") or name in _CALLBACKS:
            problems.append(f'"{name}" is a callback: featureplane sets its own')
        elif value is None or not isinstance(value, str | int | float | bool):
            problems.append(
                f'"{name}" must be a string, number or true/false, not {_json_kind(value)}'
            )
        elif name.endswith(".location") and value != "probe" and not Path(str(value)).exists():
            problems.append(f'"{name}": no file or folder at {value}')
        else:
            out[name] = value
    if problems:
        raise ValueError("; ".join(problems))
    return out


def _msk_iam_region(props: Mapping[str, Value]) -> str | None:
    """The region to sign MSK IAM tokens for, or None without `MSK_IAM`; ValueError when
    the other properties, the region or the signer package are missing."""
    value = props.get(MSK_IAM, False)
    if value is False:
        return None
    if value is not True and not (isinstance(value, str) and value.strip()):
        raise ValueError(f'"{MSK_IAM}" must be true or an AWS region, like "us-east-1"')
    wrong = [f'"{k}": "{v}"' for k, v in _IAM_NEEDS.items() if props.get(k) != v]
    if wrong:
        raise ValueError(f'"{MSK_IAM}" needs {" and ".join(wrong)}')
    if importlib.util.find_spec(_SIGNER) is None:
        raise ValueError(
            f'"{MSK_IAM}" needs the package aws-msk-iam-sasl-signer-python: '
            "pip install aws-msk-iam-sasl-signer-python"
        )
    region = value if isinstance(value, str) else _aws_region()
    if not region:
        raise ValueError(
            f'"{MSK_IAM}": no AWS region; set AWS_REGION, or give it: "{MSK_IAM}": "us-east-1"'
        )
    return region.strip()


def _aws_region() -> str | None:
    import botocore.session

    region = os.environ.get("AWS_REGION") or botocore.session.Session().get_config_variable(
        "region"
    )
    return str(region) if region else None


def msk_iam_token(region: str) -> Callable[[str], tuple[str, float]]:
    """librdkafka's `oauth_cb` for Amazon MSK IAM: a token signed with the AWS credentials
    found now (the pod's role, the machine's, the variables), and when it expires, in
    seconds since the epoch. librdkafka calls it again before then."""
    from aws_msk_iam_sasl_signer import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        MSKAuthTokenProvider,
    )

    def oauth_cb(_config: str) -> tuple[str, float]:
        token, expiry_ms = MSKAuthTokenProvider.generate_auth_token(region)
        return str(token), int(expiry_ms) / 1000

    return oauth_cb


def _librdkafka_accepts(props: Mapping[str, Value]) -> None:
    """Raise ValueError naming the property librdkafka refuses (unknown, bad value, a CA
    or key file it cannot load, a SASL mechanism this build lacks)."""
    from confluent_kafka import KafkaException, Producer

    quiet = logging.getLogger("featureplane.kafka_config.check")
    quiet.propagate = False  # a handle with no brokers warns that it has none
    quiet.addHandler(logging.NullHandler())
    try:
        producer = Producer({**props, "logger": quiet})
    except KafkaException as exc:
        err = exc.args[0] if exc.args else exc
        reason = str(err.str() if hasattr(err, "str") else err)
        raise ValueError(f"librdkafka refuses it: {_redacted(reason, props)}") from None
    except (TypeError, ValueError) as exc:  # confluent-kafka's own checks of its properties
        raise ValueError(f"librdkafka refuses it: {_redacted(str(exc), props)}") from None
    del producer  # destroyed at once: it never connected


def _redacted(text: str, props: Mapping[str, Value]) -> str:
    for key, value in props.items():
        secret = str(value)
        if secret and any(hint in key for hint in _SECRET_HINTS):
            text = text.replace(secret, "***")
    return text.removeprefix("Failed to create producer: ")


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return "a number"
