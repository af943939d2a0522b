"""Signed desired states: what the fleet wants a device (or group) to run.

The envelope published (retained) on a ``desired`` topic is::

    {"schema": 1, "desired": "<the document as a JSON string>", "signatures": {...}}

The signatures are ed25519 over the raw bytes of ``desired`` (the same signature document as a
bundle's ``signatures.json``), so no JSON canonicalisation is needed to check them. The document
(:class:`DesiredState`) names the model, its version, one bundle per profile (sha256 and size), an
expiry, and a desired-state ``version`` that only ever grows: a device refuses anything not newer
than what it last accepted, which stops replayed (retained) messages and rollback attacks (as TUF's
and Uptane's version numbers do).
"""

from __future__ import annotations

import json
import time

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgepack.bundle.format import is_valid_name, is_valid_semver
from edgepack.bundle.signing import sign_manifest, verify_manifest_signatures
from edgepack.errors import EdgepackError, SignatureError

from .topics import SCHEMA

#: a desired-state message larger than this is refused unparsed
MAX_DESIRED_BYTES = 64 * 1024


class DesiredStateError(EdgepackError):
    """A desired state the device refuses; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BundleRef(_Strict):
    """One profile's bundle: what the device fetches (by sha256) and how large it may be."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0, le=8 * 1024 ** 3)
    file: str | None = None


class ModelRef(_Strict):
    name: str
    version: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError("not a valid model name")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not is_valid_semver(value):
            raise ValueError("not a semantic version")
        return value


class DesiredState(_Strict):
    """The signed document."""

    schema_: int = Field(SCHEMA, alias="schema")
    version: int = Field(ge=1, description="desired-state version; grows with every publication")
    device: str | None = None
    group: str | None = None
    issued_at: float
    expires_at: float
    model: ModelRef
    bundles: dict[str, BundleRef] = Field(min_length=1, description="profile -> bundle")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _target(self) -> "DesiredState":
        if bool(self.device) == bool(self.group):
            raise ValueError("name exactly one of device or group")
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        return self

    def for_profile(self, profile: str | None) -> BundleRef:
        """The bundle for ``profile``; DesiredStateError 'profile' when there is none."""
        if profile is None:
            if len(self.bundles) == 1:
                return next(iter(self.bundles.values()))
            raise DesiredStateError("profile", "the desired state has bundles for several profiles and this "
                                    "device has no profile set in agent.yaml")
        if profile not in self.bundles:
            raise DesiredStateError("profile", f"the desired state has no bundle for profile {profile!r} "
                                    f"(only {', '.join(sorted(self.bundles))})")
        return self.bundles[profile]

    def document(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


def sign_desired(state: DesiredState, private_key) -> bytes:
    """The envelope (JSON bytes) of ``state`` signed with ``private_key``."""
    raw = json.dumps(state.document(), sort_keys=True, separators=(",", ":"))
    signatures = sign_manifest(raw.encode(), private_key)
    return json.dumps({"schema": SCHEMA, "desired": raw, "signatures": signatures}).encode()


def verify_desired(payload: bytes, public_keys, now: float | None = None) -> DesiredState:
    """The desired state in ``payload`` after checking it is signed by one of ``public_keys`` and not
    expired; raises DesiredStateError with reason ``malformed``, ``unsigned``, ``untrusted``,
    ``bad-signature`` or ``expired``."""
    if len(payload) > MAX_DESIRED_BYTES:
        raise DesiredStateError("malformed", f"desired state of {len(payload)} bytes is larger than {MAX_DESIRED_BYTES}")
    try:
        envelope = json.loads(payload)
    except (ValueError, RecursionError):
        raise DesiredStateError("malformed", "desired state is not JSON") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("desired"), str):
        raise DesiredStateError("malformed", "desired state envelope needs a 'desired' string")
    if envelope.get("schema") != SCHEMA:
        raise DesiredStateError("malformed", f"desired state schema {envelope.get('schema')!r} is not {SCHEMA}")
    raw = envelope["desired"].encode()
    signatures = envelope.get("signatures")
    if not signatures or not isinstance(signatures, dict) or not signatures.get("signatures"):
        raise DesiredStateError("unsigned", "desired state is not signed; sign it with 'edgepack fleet push --key'")
    try:
        valid = verify_manifest_signatures(raw, signatures, public_keys)
    except SignatureError as exc:
        raise DesiredStateError("bad-signature", exc.message.replace("bundle signature", "desired-state signature")
                                .replace("the manifest", "the desired state")) from None
    if not valid:
        raise DesiredStateError("untrusted", "desired state is not signed by any of this device's trusted keys")
    try:
        state = DesiredState.model_validate(json.loads(raw))
    except ValidationError as exc:
        from edgepack.profiles import validation_problems

        raise DesiredStateError("malformed", "desired state is invalid: " + "; ".join(validation_problems(exc))) from None
    except (ValueError, RecursionError):
        raise DesiredStateError("malformed", "desired state document is not JSON") from None
    now = time.time() if now is None else now
    if state.expires_at <= now:
        raise DesiredStateError("expired", f"desired state version {state.version} expired "
                                f"{now - state.expires_at:.0f} s ago")
    return state
