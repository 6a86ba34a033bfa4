"""Call Shepherd's router from Python, as an internal service would.

make run                                   # in another terminal; note the dev API key
SHEPHERD_API_KEY=sk-shepherd-... .venv/bin/python examples/chat.py --model tiny "Hello"
SHEPHERD_API_KEY=sk-shepherd-... .venv/bin/python examples/chat.py --stream --model tiny-stream "Hi"
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
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    args = parser.parse_args()
    key = os.environ.get("SHEPHERD_API_KEY", "")
    if not key:
        print("set SHEPHERD_API_KEY to the key `make run` printed", file=sys.stderr)
        return 2
    messages = [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=args.prompt)]
    params = common_pb2.GenerationParams(max_tokens=args.max_tokens)
    metadata = [("authorization", f"Bearer {key}")]
    with grpc.insecure_channel(args.router) as channel:
        router = router_pb2_grpc.RouterServiceStub(channel)
        try:
            if args.stream:
                final = None
                request = router_pb2.ChatStreamRequest(
                    model=args.model, messages=messages, params=params
                )
                for chunk in router.ChatStream(request, metadata=metadata, timeout=args.timeout):
                    if chunk.HasField("delta"):
                        print(chunk.delta.text, end="", flush=True)
                    else:
                        final = chunk.final
                print()
                assert final is not None
                summary(
                    final.model,
                    final.placement,
                    final.usage,
                    final.cost,
                    final.cache_hit,
                    final.trace_id,
                )
                print(f"  finish {common_pb2.FinishReason.Name(final.finish_reason)}")
                return 0
            answer = router.Chat(
                router_pb2.ChatRequest(model=args.model, messages=messages, params=params),
                metadata=metadata,
                timeout=args.timeout,
            )
        except grpc.RpcError as error:
            print(f"\n{error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(answer.text)
    summary(
        answer.model, answer.placement, answer.usage, answer.cost, answer.cache_hit, answer.trace_id
    )
    return 0


def summary(
    model: str,
    placement: common_pb2.Placement,
    usage: common_pb2.Usage,
    cost: common_pb2.Money,
    cache_hit: bool,
    trace_id: str,
) -> None:
    where = common_pb2.BackendKind.Name(placement.kind)
    dollars, nanos = divmod(cost.nano_usd, 1_000_000_000)
    print(
        f"\n[{model} on {placement.deployment} ({where}), "
        f"{usage.prompt_tokens}+{usage.completion_tokens} tokens, "
        f"${dollars}.{nanos:09d}, cache_hit={cache_hit}, trace {trace_id}]"
    )


if __name__ == "__main__":
    raise SystemExit(main())
