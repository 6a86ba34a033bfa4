"""Request validation: every problem in a ChatRequest, reported at once, per field.

Validation happens before any work is queued, so a caller learns all of what is wrong from
one INVALID_ARGUMENT with google.rpc.BadRequest field violations, and nothing is billed.
"""

from __future__ import annotations

from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2

from libs.catalog import Model
from libs.errors import invalid_argument
from libs.generation import (
    cache_policy_violations,
    message_violations,
    params_violations,
    priority_violations,
)

MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 200_000
MAX_REQUEST_ID_CHARS = 128


def resolved_params(request: router_pb2.ChatRequest, model: Model) -> common_pb2.GenerationParams:
    """Validate the request against its model; return the parameters with defaults filled in."""
    violations: list[tuple[str, str]] = []
    if not request.messages:
        violations.append(("messages", "at least one message is required"))
    if len(request.messages) > MAX_MESSAGES:
        violations.append(("messages", f"at most {MAX_MESSAGES} messages are allowed"))
    violations.extend(message_violations(request.messages))
    for index, message in enumerate(request.messages):
        if not message.content.strip():
            violations.append((f"messages[{index}].content", "must not be empty"))
        elif len(message.content) > MAX_CONTENT_CHARS:
            violations.append(
                (f"messages[{index}].content", f"must be at most {MAX_CONTENT_CHARS} characters")
            )
    params = request.params
    violations.extend(params_violations(params, model, resolved=False))
    violations.extend(priority_violations(request.priority))
    violations.extend(cache_policy_violations(request.cache_policy))
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        violations.append(("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters"))
    if violations:
        raise invalid_argument(violations)
    resolved = common_pb2.GenerationParams()
    resolved.CopyFrom(params)
    if resolved.max_tokens == 0:
        resolved.max_tokens = model.default_max_tokens
    return resolved
