"""The use-case layer: the REST API, the CLI's local commands and the jobs call only this.

`Service` (facade.py) groups the use cases by domain; `gate.py` holds the request path they
all take. Nothing here imports pydantic or speaks JSON or base64.
"""

from kmsgate.service.facade import Service
from kmsgate.service.gate import STATE_CHANGING, Call, Ctx, Gate, KeyTarget

__all__ = ["STATE_CHANGING", "Call", "Ctx", "Gate", "KeyTarget", "Service"]
