"""awskms: keys held by AWS KMS (or an endpoint speaking its API: a VPC endpoint, LocalStack,
moto), through boto3. The package exports the backend class, its settings and the Sign request
planning; see docs/backends/awskms.md."""

from kmsgate.backends.awskms.backend import AwsKmsBackend
from kmsgate.backends.awskms.settings import AwsKmsSettings, RateLimits
from kmsgate.backends.awskms.specs import SignPlan, sign_plan

__all__ = ["AwsKmsBackend", "AwsKmsSettings", "RateLimits", "SignPlan", "sign_plan"]
