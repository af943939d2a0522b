"""Signed desired states: what the fleet wants a device (or group) to run.

The envelope published (retained) on a ``desired`` topic is::

    {"schema": 1, "desired": "<the document as a JSON string>", "signatures": {...}}

The signatures are ed25519 over :data:`DOMAIN` followed by the raw bytes of ``desired`` (the same
signature document as a bundle's ``signatures.json``), so no JSON canonicalisation is needed to check
them, and the signed bytes of a desired state can never be those of a bundle manifest (which start
with ``{``): a signature made for one role is never valid in the other. Desired states are checked
against the device's ``fleet_keys``, bundles against its ``trusted_keys`` (the build keys).

The document (:class:`DesiredState`) names the model, its version, one bundle per profile (sha256,
size and the digest of every chunk, so a device checks each chunk before it writes it and a forged
frame costs nothing but itself), the probation budget the device enforces, an expiry, and a
desired-state ``version`` that only ever grows: a device refuses anything not newer than what it last
accepted, which stops replayed (retained) messages and rollback attacks (as TUF's and Uptane's
version numbers do).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from edgepack.bundle.format import is_valid_name, is_valid_semver
from edgepack.bundle.signing import sign_manifest, verify_manifest_signatures
from edgepack.errors import EdgepackError, SignatureError

from .topics import SCHEMA

#: a desired-state message larger than this is refused unparsed (AWS IoT Core's limit is 128 KiB)
MAX_DESIRED_BYTES = 120 * 1024
#: prefixed to the document before signing (domain separation from bundle manifests)
DOMAIN = b"edgepack-desired-state-v1\n"
#: bytes of sha256 kept per chunk in the signed list (128 bits: a second preimage costs 2**128)
CHUNK_DIGEST_BYTES = 16


class DesiredStateError(EdgepackError):
    """A desired state the device refuses; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def chunk_digest(data: bytes) -> bytes:
    """The digest of one chunk as the signed list holds it."""
    return hashlib.sha256(data).digest()[:CHUNK_DIGEST_BYTES]


def chunk_digests_of(path, chunk_bytes: int) -> str:
    """The signed chunk list of a bundle file: base64 of every chunk's :func:`chunk_digest`, in order."""
    digests = []
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            digests.append(chunk_digest(block))
    return base64.b64encode(b"".join(digests)).decode()


class BundleRef(_Strict):
    """One profile's bundle: what the device fetches (by sha256), how large it is, and the digest of
    each of its ``chunk_bytes``-sized chunks (``chunks``: base64 of 16-byte truncated sha256 digests)."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0, le=8 * 1024 ** 3)
    chunk_bytes: int = Field(gt=0, le=16 * 1024 * 1024)
    chunks: str = Field(min_length=1)
    file: str | None = None
    #: where the device may download it with HTTP(S) Range requests (an object store, a CDN, nginx,
    #: ``fleet serve --http``); absent: MQTT chunks. Signed, so a broker cannot point devices elsewhere.
    url: str | None = Field(None, max_length=2048)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            from urllib.parse import urlsplit

            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("url must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _chunk_list(self) -> "BundleRef":
        try:
            raw = base64.b64decode(self.chunks, validate=True)
        except ValueError:
            raise ValueError("chunks must be base64") from None
        if len(raw) != -(-self.size // self.chunk_bytes) * CHUNK_DIGEST_BYTES:
            raise ValueError("chunks must hold one digest per chunk of the bundle")
        return self

    def chunk_digests(self) -> list[bytes]:
        """The signed digest of every chunk, in order."""
        raw = base64.b64decode(self.chunks)
        return [raw[i:i + CHUNK_DIGEST_BYTES] for i in range(0, len(raw), CHUNK_DIGEST_BYTES)]


class ProbationBudget(_Strict):
    """What a device enforces on a new version before it commits it (absent keys: the device's
    ``updates`` settings, whose defaults only catch a broken model)."""

    duration_s: float | None = Field(None, ge=0, le=7 * 86400, description="how long the new version is watched")
    min_runs: int | None = Field(None, ge=1, le=1_000_000, description="runs needed before rates are judged")
    max_error_rate: float | None = Field(None, ge=0, le=1, description="failed runs / runs, above the old version's")
    max_nonfinite_rate: float | None = Field(None, ge=0, le=1, description="runs with NaN/Inf outputs / runs, above the old's")
    max_latency_ratio: float | None = Field(None, gt=1, description="new time per sample / old, measured side by side")
    max_p95_ms: float | None = Field(None, gt=0, description="absolute limit on the p95 time of one run")


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
        return _semver(value)


def _semver(value: str) -> str:
    if not is_valid_semver(value):
        raise ValueError("not a semantic version")
    return value


def _bundle_for(bundles: dict[str, "BundleRef"], profile: str | None, what: str) -> "BundleRef":
    """``what``'s bundle for ``profile``; DesiredStateError 'profile' when there is none."""
    if profile is None:
        if len(bundles) == 1:
            return next(iter(bundles.values()))
        raise DesiredStateError("profile", f"{what} has bundles for several profiles and this "
                                "device has no profile set in agent.yaml")
    if profile not in bundles:
        raise DesiredStateError("profile", f"{what} has no bundle for profile {profile!r} "
                                f"(only {', '.join(sorted(bundles))})")
    return bundles[profile]


class ShadowRef(_Strict):
    """A candidate version the device runs in shadow beside the active one: it sees the answered
    inputs off the request path and reports how often it agrees (agents that list ``shadow`` in
    ``accepts``)."""

    version: str
    bundles: dict[str, BundleRef] = Field(min_length=1, description="profile -> the candidate's bundle")
    sample_rate: float | None = Field(None, gt=0, le=1, description="share of answered requests mirrored")
    cpu_share: float | None = Field(None, gt=0, le=1, description="most of one core the shadow may take")

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        return _semver(value)

    def for_profile(self, profile: str | None) -> BundleRef:
        return _bundle_for(self.bundles, profile, "the desired state's shadow")


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
    probation: ProbationBudget | None = None
    #: set on a desired state re-signed only to renew its expiry (the fleet's freshness statement):
    #: the version of the first state of that chain. A device that failed that target does not take
    #: the renewal as a new offer to try again (a new offer or push leaves it out).
    renews: int | None = Field(None, ge=1)
    #: a candidate version to run in shadow beside ``model`` (a rollout's shadow stage)
    shadow: ShadowRef | None = None
    #: sha256 of the signed document's bytes (set by verify_desired): tells a re-signed document
    #: that reuses an accepted version from the retained copy of that very document
    _digest: str | None = PrivateAttr(None)
    #: this device's profile's shadow bundle, set by the agent's acceptance check
    _shadow_bundle: BundleRef | None = PrivateAttr(None)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _target(self) -> "DesiredState":
        if bool(self.device) == bool(self.group):
            raise ValueError("name exactly one of device or group")
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        if self.shadow is not None and self.shadow.version == self.model.version:
            raise ValueError("the shadow version must differ from the model's")
        return self

    def for_profile(self, profile: str | None) -> BundleRef:
        """The bundle for ``profile``; DesiredStateError 'profile' when there is none."""
        return _bundle_for(self.bundles, profile, "the desired state")

    @property
    def digest(self) -> str | None:
        """sha256 of the signed bytes this state was read from (None for a state built here)."""
        return self._digest

    def document(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


def sign_desired(state: DesiredState, private_key) -> bytes:
    """The envelope (JSON bytes) of ``state`` signed with ``private_key``."""
    raw = json.dumps(state.document(), sort_keys=True, separators=(",", ":"))
    signatures = sign_manifest(DOMAIN + raw.encode(), private_key)
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
    try:
        raw = envelope["desired"].encode()
    except UnicodeEncodeError:  # a lone surrogate (valid JSON, not valid UTF-8)
        raise DesiredStateError("malformed", "desired state is not valid UTF-8") from None
    signatures = envelope.get("signatures")
    if not signatures or not isinstance(signatures, dict) or not signatures.get("signatures"):
        raise DesiredStateError("unsigned", "desired state is not signed; sign it with 'edgepack fleet push --key'")
    try:
        valid = verify_manifest_signatures(DOMAIN + raw, signatures, public_keys)
    except SignatureError as exc:
        raise DesiredStateError("bad-signature", exc.message.replace("bundle signature", "desired-state signature")
                                .replace("the manifest", "the desired state")) from None
    if not valid:
        raise DesiredStateError("untrusted", "desired state is not signed by any of this device's fleet keys "
                                "(fleet_keys in agent.yaml)")
    try:
        state = DesiredState.model_validate(json.loads(raw))
    except ValidationError as exc:
        from edgepack.profiles import validation_problems

        raise DesiredStateError("malformed", "desired state is invalid: " + "; ".join(validation_problems(exc))) from None
    except (ValueError, RecursionError):
        raise DesiredStateError("malformed", "desired state document is not JSON") from None
    state._digest = hashlib.sha256(raw).hexdigest()
    now = time.time() if now is None else now
    if state.expires_at <= now:
        raise DesiredStateError("expired", f"desired state version {state.version} expired "
                                f"{now - state.expires_at:.0f} s ago")
    return state
