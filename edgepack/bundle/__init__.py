"""The edgepack bundle: one deterministic, signed, self-describing file per model and profile.

See DESIGN.md section 4. ``write_bundle`` creates one, ``open_bundle`` reads one with every check done
before anything is used, and ``signing`` holds the ed25519 keys and signatures.
"""

from .format import MANIFEST_NAME, SCHEMA, SIGNATURES_NAME, bundle_filename
from .reader import Bundle, open_bundle
from .writer import BundleWriter, write_bundle

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA",
    "SIGNATURES_NAME",
    "Bundle",
    "BundleWriter",
    "bundle_filename",
    "open_bundle",
    "write_bundle",
]
