"""Call Shepherd's router from Python, as an internal service would.

make run                                   # in another terminal; note the dev API key
SHEPHERD_API_KEY=sk-shepherd-... .venv/bin/python examples/chat.py --model tiny "Hello"
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc


def main() -> int:
    parser = argparse.ArgumentParser(description="Send one chat message through Shepherd.")
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--model", default="tiny", help="model name or alias (default: tiny)")
    parser.add_argument("--router", default="127.0.0.1:50051", help="router address")
    parser.add_argument("--max-tokens", type=int, default=0, help="0 uses the model's default")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    args = parser.parse_args()
    key = os.environ.get("SHEPHERD_API_KEY", "")
    if not key:
        print("set SHEPHERD_API_KEY to the key `make run` printed", file=sys.stderr)
        return 2
    with grpc.insecure_channel(args.router) as channel:
        router = router_pb2_grpc.RouterServiceStub(channel)
        try:
            answer = router.Chat(
                router_pb2.ChatRequest(
                    model=args.model,
                    messages=[
                        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=args.prompt)
                    ],
                    params=common_pb2.GenerationParams(max_tokens=args.max_tokens),
                ),
                metadata=[("authorization", f"Bearer {key}")],
                timeout=args.timeout,
            )
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    where = common_pb2.BackendKind.Name(answer.placement.kind)
    dollars, nanos = divmod(answer.cost.nano_usd, 1_000_000_000)
    print(answer.text)
    print(
        f"\n[{answer.model} on {answer.placement.deployment} ({where}), "
        f"{answer.usage.prompt_tokens}+{answer.usage.completion_tokens} tokens, "
        f"${dollars}.{nanos:09d}, cache_hit={answer.cache_hit}, "
        f"trace {answer.trace_id}]"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
