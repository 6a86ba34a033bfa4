"""Request validation: every problem in a ChatRequest, reported at once, per field.

Validation happens before any work is queued, so a caller learns all of what is wrong from
one INVALID_ARGUMENT with google.rpc.BadRequest field violations, and nothing is billed.
"""

from __future__ import annotations

import math

from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2

from libs.catalog import Model
from libs.errors import invalid_argument

MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 200_000
MAX_REQUEST_ID_CHARS = 128
_ROLES = (common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT)


def resolved_params(request: router_pb2.ChatRequest, model: Model) -> common_pb2.GenerationParams:
    """Validate the request against its model; return the parameters with defaults filled in."""
    violations: list[tuple[str, str]] = []
    if not request.messages:
        violations.append(("messages", "at least one message is required"))
    if len(request.messages) > MAX_MESSAGES:
        violations.append(("messages", f"at most {MAX_MESSAGES} messages are allowed"))
    for index, message in enumerate(request.messages):
        if message.role not in _ROLES:
            violations.append(
                (f"messages[{index}].role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
            )
        if not message.content.strip():
            violations.append((f"messages[{index}].content", "must not be empty"))
        elif len(message.content) > MAX_CONTENT_CHARS:
            violations.append(
                (f"messages[{index}].content", f"must be at most {MAX_CONTENT_CHARS} characters")
            )
    params = request.params
    if params.max_tokens < 0 or params.max_tokens > model.max_output_tokens:
        violations.append(
            (
                "params.max_tokens",
                f"must be between 1 and {model.max_output_tokens} for {model.name}"
                " (0 uses the model's default)",
            )
        )
    if not math.isfinite(params.temperature) or not 0.0 <= params.temperature <= 2.0:
        violations.append(("params.temperature", "must be between 0 and 2"))
    if not math.isfinite(params.top_p) or not 0.0 <= params.top_p <= 1.0:
        violations.append(("params.top_p", "must be in (0, 1], or 0 for the default"))
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        violations.append(("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters"))
    if violations:
        raise invalid_argument(violations)
    resolved = common_pb2.GenerationParams()
    resolved.CopyFrom(params)
    if resolved.max_tokens == 0:
        resolved.max_tokens = model.default_max_tokens
    return resolved
