"""Embeddings and retrieval-augmented chat through the router of a real mesh.

What a calling service sees: RouterService/Embed returns unit vectors in input order, billed
by input tokens and cached for an identical request; shepherd-rag answers through the normal
Chat and ChatStream path with the ids of the documents it retrieved, on every path (computed,
streamed, from the cache), and its trace names the ensemble's steps.
"""

from __future__ import annotations

import json
import uuid

import grpc
import numpy as np
from shepherd.billing.v1 import billing_pb2_grpc
from shepherd.common.v1 import common_pb2
from shepherd.router.v1 import router_pb2, router_pb2_grpc

from deploy.local.launcher import LocalMesh
from tests.integration.conftest import Metadata, tenant_totals
from tests.integration.test_mesh import (
    TIMEOUT_S,
    auth,
    chat_request,
    expected_cost,
    grpcurl,
    rpc_error,
)
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.rag import STEPS, corpus, embed_tiny, embedding_tokens, first_sentence


def embed_request(*inputs: str, **fields: object) -> router_pb2.EmbedRequest:
    return router_pb2.EmbedRequest(model="embed", inputs=inputs, **fields)  # type: ignore[arg-type]


def vectors(response: router_pb2.EmbedResponse) -> np.ndarray:
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


# -- Embed -----------------------------------------------------------------------------------


def test_embed_returns_unit_vectors_in_input_order_billed_by_input_tokens(
    router: router_pb2_grpc.RouterServiceStub,
    billing: billing_pb2_grpc.BillingServiceStub,
    admin_md: Metadata,
    tenant: tuple[str, str],
) -> None:
    name, key = tenant
    inputs = [f"rivers and bells {uuid.uuid4().hex}", "Tell me about Mouzan", "a"]
    response = router.Embed(embed_request(*inputs), metadata=auth(key), timeout=TIMEOUT_S)

    assert response.model == "shepherd-embed"
    got = vectors(response)
    assert got.shape == (3, embed_tiny.DIMENSIONS)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    expected, counts = embed_tiny.TinyEncoder().encode(inputs)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    tokens = sum(embedding_tokens(text) for text in inputs)
    assert counts == [embedding_tokens(text) for text in inputs]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (tokens, 0)
    assert response.usage.total_tokens == tokens
    assert response.cost.nano_usd == expected_cost("shepherd-embed", response.usage) > 0
    assert response.placement.deployment == "local/embed_tiny"
    assert response.placement.kind == common_pb2.BACKEND_KIND_TRITON
    assert response.placement.batch_size >= 3
    assert not response.cache_hit
    assert len(response.trace_id) == 32

    totals = tenant_totals(billing, admin_md, name)
    [model] = totals.models
    assert (model.model, model.requests) == ("shepherd-embed", 1)
    assert (model.usage.prompt_tokens, model.usage.completion_tokens) == (tokens, 0)
    assert totals.cost.nano_usd == response.cost.nano_usd


def test_an_identical_embed_request_is_answered_from_the_cache_at_no_cost(
    router: router_pb2_grpc.RouterServiceStub,
    billing: billing_pb2_grpc.BillingServiceStub,
    admin_md: Metadata,
    tenant: tuple[str, str],
) -> None:
    name, key = tenant
    inputs = [f"cache me {uuid.uuid4().hex}", "and me"]
    first = router.Embed(embed_request(*inputs), metadata=auth(key), timeout=TIMEOUT_S)
    again = router.Embed(embed_request(*inputs), metadata=auth(key), timeout=TIMEOUT_S)
    reordered = router.Embed(
        embed_request(*reversed(inputs)), metadata=auth(key), timeout=TIMEOUT_S
    )
    bypass = router.Embed(
        embed_request(*inputs, cache_policy=common_pb2.CACHE_POLICY_BYPASS),
        metadata=auth(key),
        timeout=TIMEOUT_S,
    )

    assert not first.cache_hit and again.cache_hit
    assert again.cost.nano_usd == 0 and first.cost.nano_usd > 0
    np.testing.assert_array_equal(vectors(again), vectors(first))
    assert again.usage == first.usage
    assert not reordered.cache_hit, "another request: the inputs in another order"
    np.testing.assert_allclose(vectors(reordered), vectors(first)[::-1], atol=1e-6)
    assert not bypass.cache_hit
    totals = tenant_totals(billing, admin_md, name)
    assert (totals.requests, totals.models[0].cache_hits) == (4, 1)
    assert totals.cost.nano_usd == first.cost.nano_usd + reordered.cost.nano_usd + (
        bypass.cost.nano_usd
    )


def test_embed_reports_every_problem_with_its_inputs_and_model(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    bad = rpc_error(
        lambda: router.Embed(
            embed_request("fine", "", "   ", priority=99), metadata=auth(key), timeout=TIMEOUT_S
        )
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    for field in ("inputs[1]", "inputs[2]", "priority"):
        assert field in (bad.details() or "")
    none = rpc_error(lambda: router.Embed(embed_request(), metadata=auth(key), timeout=TIMEOUT_S))
    assert none.code() == grpc.StatusCode.INVALID_ARGUMENT
    too_many = rpc_error(
        lambda: router.Embed(embed_request(*(["x"] * 257)), metadata=auth(key), timeout=TIMEOUT_S)
    )
    assert "at most 256 inputs" in (too_many.details() or "")
    chat_model = rpc_error(
        lambda: router.Embed(
            router_pb2.EmbedRequest(model="tiny", inputs=["x"]), metadata=auth(key), timeout=5
        )
    )
    assert chat_model.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shepherd-tiny is a chat model" in (chat_model.details() or "")
    chat_on_embed = rpc_error(
        lambda: router.Chat(chat_request("embed", "hi"), metadata=auth(key), timeout=5)
    )
    assert chat_on_embed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shepherd-embed is an embedding model" in (chat_on_embed.details() or "")
    anonymous = rpc_error(lambda: router.Embed(embed_request("x"), timeout=5))
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED


def test_list_models_says_which_model_embeds(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    models = {
        m.name: m
        for m in router.ListModels(router_pb2.ListModelsRequest(), metadata=auth(key)).models
    }
    assert models["shepherd-embed"].task == router_pb2.MODEL_TASK_EMBEDDING
    assert models["shepherd-rag"].task == router_pb2.MODEL_TASK_CHAT
    assert models["shepherd-tiny"].task == router_pb2.MODEL_TASK_CHAT


# -- RAG chat --------------------------------------------------------------------------------


def test_rag_chat_answers_with_the_documents_it_retrieved(
    router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    doc_id, _, text = corpus()[123]
    question = first_sentence(text)
    answer = router.Chat(chat_request("rag", question), metadata=auth(key), timeout=TIMEOUT_S)
    streamed = list(
        router.ChatStream(
            router_pb2.ChatStreamRequest(
                model="rag",
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=question)],
                cache_policy=common_pb2.CACHE_POLICY_BYPASS,
            ),
            metadata=auth(key),
            timeout=TIMEOUT_S,
        )
    )
    cached = router.Chat(chat_request("rag", question), metadata=auth(key), timeout=TIMEOUT_S)

    assert answer.model == "shepherd-rag"
    assert answer.text.strip()
    assert answer.document_ids[0] == doc_id and len(answer.document_ids) == 3
    assert answer.placement.backend_model == "rag_tiny"
    # The prompt tiny_lm was billed for holds the documents, not only the question.
    assert answer.usage.prompt_tokens > 40
    assert answer.cost.nano_usd == expected_cost("shepherd-rag", answer.usage)
    final = streamed[-1].final
    assert "".join(c.delta.text for c in streamed[:-1]) == answer.text, "deterministic"
    assert list(final.document_ids) == list(answer.document_ids)
    assert not final.cache_hit
    assert cached.cache_hit and cached.cost.nano_usd == 0
    assert (cached.text, list(cached.document_ids)) == (answer.text, list(answer.document_ids))


def test_the_rag_trace_shows_the_ensemble_call_and_its_steps(
    otlp: OtlpReceiver, router: router_pb2_grpc.RouterServiceStub, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    answer = router.Chat(
        chat_request("rag", f"trace the rivers {uuid.uuid4().hex}"),
        metadata=auth(key),
        timeout=TIMEOUT_S,
    )
    spans = otlp.wait_for_trace(
        answer.trace_id, {"shepherd-router", "shepherd-scheduler"}, {"scheduler.batch"}
    )
    # The batch's span is its call to the node.
    [call] = [s for s in spans if s.name == "scheduler.batch"]
    assert call.attribute("shepherd.triton.model") == "rag_tiny"
    assert call.attribute("shepherd.triton.ensemble_steps") == STEPS


def test_grpcurl_embeds_and_asks_the_rag_model(mesh: LocalMesh, tenant: tuple[str, str]) -> None:
    """The README's grpcurl examples, as an operator runs them."""
    _, key = tenant
    router = mesh.address("router")
    header = ("-H", f"authorization: Bearer {key}")
    inputs = ["What is Mouzan known for?", "bells"]
    embedded = json.loads(
        grpcurl(
            *header,
            "-d",
            json.dumps({"model": "embed", "inputs": inputs}),
            router,
            "shepherd.router.v1.RouterService/Embed",
        )
    )
    assert len(embedded["embeddings"]) == 2
    assert len(embedded["embeddings"][0]["values"]) == embed_tiny.DIMENSIONS
    usage = embedded["usage"]
    tokens = sum(embedding_tokens(text) for text in inputs)
    assert int(usage.get("promptTokens", usage.get("prompt_tokens", 0))) == tokens
    asked = json.loads(
        grpcurl(
            *header,
            "-d",
            json.dumps(
                {
                    "model": "rag",
                    "messages": [{"role": "ROLE_USER", "content": "Tell me about Mouzan"}],
                }
            ),
            router,
            "shepherd.router.v1.RouterService/Chat",
        )
    )
    assert asked.get("documentIds", asked.get("document_ids"))[0] == "doc-001"
    assert asked["text"]
