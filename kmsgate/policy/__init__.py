"""Authorization policy: Rego files evaluated in-process (regorus), deny by default.

`input.py` builds the input document every decision sees; `engine.py` loads the policy,
decides, caches decisions, reloads and runs the Rego tests.
"""

from kmsgate.policy.engine import (
    ALLOW_RULE,
    REASONS_RULE,
    Decision,
    PolicyEngine,
    PolicyTestResult,
)
from kmsgate.policy.input import ACTIONS, policy_input

__all__ = [
    "ACTIONS",
    "ALLOW_RULE",
    "REASONS_RULE",
    "Decision",
    "PolicyEngine",
    "PolicyTestResult",
    "policy_input",
]
