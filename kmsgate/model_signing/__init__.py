"""Model signing: model_signing-compatible manifests, DSSE, Sigstore bundles, SLSA provenance.

Public API:
- `sign_model(dir, GatewaySigner(client, key))`: hash locally, sign through the gateway.
- `verify_model(dir, bundle, trust)`: with `PublicKeyTrust`, `GatewayTrust` or `TrustBundle`.
- `require_verified(path)`: the model-server gate (MODEL_SIGNING_REQUIRED/_PUBKEY).

Formats and the exit codes are described in docs/model-signing.md.
"""

from kmsgate.model_signing.bundle import BundleError, SignedBundle
from kmsgate.model_signing.gate import ModelSigningRequired, require_verified
from kmsgate.model_signing.manifest import ManifestError
from kmsgate.model_signing.provenance import BuildInfo
from kmsgate.model_signing.report import Failure, ModelVerificationError, Report
from kmsgate.model_signing.sign import GatewaySigner, SigningError, SignResult, sign_model
from kmsgate.model_signing.trust import (
    GatewayTrust,
    PublicKeyTrust,
    TrustBundle,
    export_trust_bundle,
)
from kmsgate.model_signing.verify import VerifyOptions, verify_model

__all__ = [
    "BuildInfo",
    "BundleError",
    "Failure",
    "GatewaySigner",
    "GatewayTrust",
    "ManifestError",
    "ModelSigningRequired",
    "ModelVerificationError",
    "PublicKeyTrust",
    "Report",
    "SignResult",
    "SignedBundle",
    "SigningError",
    "TrustBundle",
    "VerifyOptions",
    "export_trust_bundle",
    "require_verified",
    "sign_model",
    "verify_model",
]
