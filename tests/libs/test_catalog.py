"""The model catalog: the shipped file, alias resolution, exact prices and config errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import grpc
import pytest

from libs.catalog import Pool, Price, QueuePolicy, Tenant, load_catalog, parse_catalog, usd_to_nano
from libs.config import DEFAULT_CATALOG, ConfigError
from libs.errors import ShepherdError


def minimal() -> dict[str, Any]:
    """A small valid catalog; tests copy it and break one thing."""
    return {
        "pools": {"local": {"nodes": ["127.0.0.1:8001"]}},
        "providers": {
            "holysheep": {"base_url": "https://api.example.test/v1/", "api_key_env": "KEY"}
        },
        "defaults": {"max_output_tokens": 1024, "batching": {"max_batch_size": 4}},
        "models": {
            "alpha": {
                "aliases": ["a1", "Alpha-One"],
                "price": {"input_usd_per_million": "1.00", "output_usd_per_million": "2.50"},
                "deployments": [{"kind": "triton", "pool": "local", "model": "alpha_lm"}],
            },
            "beta": {
                "price": {"input_usd_per_million": "0.10", "output_usd_per_million": "0.20"},
                "batching": {"max_queue_delay_ms": 7},
                "deployments": [{"kind": "hosted", "provider": "holysheep", "model": "beta"}],
            },
        },
    }


def test_shipped_catalog_loads_with_every_model_deployed() -> None:
    catalog = load_catalog(DEFAULT_CATALOG, env={})

    assert {"gpt-4.1", "claude-sonnet-4.5", "deepseek-v3.2", "shepherd-tiny"} <= set(catalog.models)
    for model in catalog.models.values():
        assert model.deployments, model.name
        assert model.default_max_tokens <= model.max_output_tokens, model.name
    tiny = catalog.models["shepherd-tiny"]
    assert tiny.deployments[0].kind == "triton"
    assert tiny.deployments[0].pool in catalog.pools
    assert tiny.batching.preferred_batch_sizes == (8, 16, 32)
    assert catalog.models["deepseek-v3.2"].price.output_nano_per_million == 420_000_000
    assert catalog.models["gpt-4.1"].price.output_nano_per_million == 8_000_000_000


@pytest.mark.parametrize("name", ["gpt4", "GPT4", " Gpt-4 ", "gpt-4.1", "GPT-4.1"])
def test_aliases_resolve_case_insensitively(name: str) -> None:
    catalog = load_catalog(DEFAULT_CATALOG, env={})
    assert catalog.resolve(name).name == "gpt-4.1"


def test_unknown_model_is_not_found_with_suggestions() -> None:
    catalog = load_catalog(DEFAULT_CATALOG, env={})

    with pytest.raises(ShepherdError) as caught:
        catalog.resolve("gpt-4.2")

    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "'gpt-4.2'" in caught.value.message
    assert "Did you mean" in caught.value.message
    assert "gpt-4.1" in caught.value.message.split("Did you mean", 1)[1]


def test_unknown_model_without_close_names_lists_known_models() -> None:
    catalog = load_catalog(DEFAULT_CATALOG, env={})

    with pytest.raises(ShepherdError) as caught:
        catalog.resolve("zzzzzzzz")

    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "Did you mean" not in caught.value.message
    assert "shepherd-tiny" in caught.value.message


def test_defaults_are_inherited_and_overridable() -> None:
    catalog = parse_catalog(minimal(), env={})

    alpha, beta = catalog.models["alpha"], catalog.models["beta"]
    assert alpha.max_output_tokens == 1024
    assert alpha.batching.max_batch_size == 4
    assert beta.batching.max_batch_size == 4
    assert beta.batching.max_queue_delay_ms == 7.0
    assert catalog.resolve("alpha-one") is alpha
    assert catalog.providers["holysheep"].base_url == "https://api.example.test/v1"
    assert alpha.deployments[0].name == "local/alpha_lm"
    assert beta.deployments[0].name == "holysheep/beta"


@pytest.mark.parametrize(
    ("usd", "nano"),
    [
        ("0.42", 420_000_000),
        ("8.00", 8_000_000_000),
        ("0", 0),
        ("0.000000001", 1),
        ("123456.123456789", 123_456_123_456_789),
        (0.1, 100_000_000),  # an unquoted YAML float goes through its shortest repr
    ],
)
def test_usd_converts_to_exact_nano(usd: object, nano: int) -> None:
    value = usd_to_nano(usd, "here")
    assert value == nano
    assert isinstance(value, int)


def test_cost_is_exact_and_rounds_half_up_once_per_request() -> None:
    deepseek = Price(input_nano_per_million=280_000_000, output_nano_per_million=420_000_000)
    assert deepseek.cost_nano(1_000_000, 1_000_000) == 700_000_000
    assert deepseek.cost_nano(1, 1) == 700  # 280 + 420 nano exactly
    assert deepseek.cost_nano(0, 0) == 0

    # 500 nano per million tokens: 1000 tokens cost exactly half a nano-dollar.
    half = Price(input_nano_per_million=500, output_nano_per_million=0)
    assert half.cost_nano(1000, 0) == 1  # half rounds up
    assert half.cost_nano(999, 0) == 0  # just under half rounds down
    assert half.cost_nano(3000, 0) == 2  # 1.5 rounds up
    assert half.cost_nano(2999, 0) == 1


def test_sum_of_many_small_costs_stays_exact() -> None:
    price = Price(
        input_nano_per_million=usd_to_nano("0.28", "in"),
        output_nano_per_million=usd_to_nano("0.42", "out"),
    )
    costs = [price.cost_nano(1_234, 567) for _ in range(100_000)]

    # 1234 * 280 + 567 * 420 nano per request, with no float anywhere.
    assert all(isinstance(cost, int) for cost in costs)
    assert costs[0] == 583_660
    assert sum(costs) == 58_366_000_000

    # A sub-nano price per token: each request is rounded once (1.5 -> 2), then summed.
    tiny = Price(input_nano_per_million=usd_to_nano("0.0000015", "in"), output_nano_per_million=0)
    assert tiny.input_nano_per_million == 1_500
    assert sum(tiny.cost_nano(1_000, 0) for _ in range(1_000)) == 2_000


def test_pool_nodes_and_provider_url_come_from_env_overrides() -> None:
    catalog = parse_catalog(
        minimal(),
        env={
            "SHEPHERD_POOL_LOCAL_NODES": " 127.0.0.1:9001, 127.0.0.1:9002 ,",
            "SHEPHERD_PROVIDER_HOLYSHEEP_BASE_URL": "http://127.0.0.1:8123/v1/",
        },
    )

    assert catalog.pools["local"].nodes == ("127.0.0.1:9001", "127.0.0.1:9002")
    assert catalog.providers["holysheep"].base_url == "http://127.0.0.1:8123/v1"


def test_shipped_catalog_honours_env_overrides() -> None:
    catalog = load_catalog(
        DEFAULT_CATALOG,
        env={
            "SHEPHERD_POOL_LOCAL_NODES": "10.0.0.5:8001",
            "SHEPHERD_PROVIDER_HOLYSHEEP_BASE_URL": "http://sim.local/v1",
        },
    )

    assert catalog.pools["local"].nodes == ("10.0.0.5:8001",)
    assert catalog.providers["holysheep"].base_url == "http://sim.local/v1"


def test_empty_env_override_keeps_the_file_values() -> None:
    catalog = parse_catalog(minimal(), env={"SHEPHERD_POOL_LOCAL_NODES": ""})
    assert catalog.pools["local"].nodes == ("127.0.0.1:8001",)


def broken(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(minimal())
    node: Any = data
    for key in path[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            broken(("models", "alpha", "deployments", "0", "pool"), "gpu"),
            ["models.alpha.deployments[0]", "unknown pool", "'gpu'"],
            id="unknown-pool",
        ),
        pytest.param(
            broken(("models", "beta", "deployments", "0", "provider"), "nobody"),
            ["models.beta.deployments[0]", "unknown provider", "'nobody'"],
            id="unknown-provider",
        ),
        pytest.param(
            broken(("models", "beta", "aliases"), ["A1"]),
            ["models.beta", "'a1'", "'alpha'"],
            id="duplicate-alias-case-insensitive",
        ),
        pytest.param(
            broken(("models", "beta", "aliases"), ["ALPHA"]),
            ["models.beta", "'alpha'"],
            id="alias-shadows-model-name",
        ),
        pytest.param(
            broken(("models", "alpha", "price", "input_usd_per_million"), "0.0000000001"),
            ["models.alpha.price", "'0.0000000001'", "at most 9 decimals"],
            id="price-too-many-decimals",
        ),
        pytest.param(
            broken(("models", "alpha", "price", "output_usd_per_million"), "two dollars"),
            ["models.alpha.price", "'two dollars'", "not a decimal"],
            id="price-not-decimal",
        ),
        pytest.param(
            broken(("models", "alpha", "price", "output_usd_per_million"), "-1"),
            ["models.alpha.price", "'-1'", "non-negative"],
            id="price-negative",
        ),
        pytest.param(
            broken(("models", "alpha", "price"), {"input_usd_per_million": "1"}),
            ["models.alpha.price", "'output_usd_per_million'"],
            id="price-missing-output",
        ),
        pytest.param(
            broken(("models", "alpha", "deployments"), []),
            ["models.alpha", "at least one deployment"],
            id="empty-deployments",
        ),
        pytest.param(
            {
                **minimal(),
                "models": {
                    "alpha": {
                        "price": {"input_usd_per_million": "1", "output_usd_per_million": "1"}
                    }
                },
            },
            ["models.alpha", "'deployments'"],
            id="missing-deployments",
        ),
        pytest.param(
            broken(("models", "alpha", "deployments", "0", "kind"), "gpu"),
            ["models.alpha.deployments[0]", "'gpu'"],
            id="unknown-kind",
        ),
        pytest.param(
            broken(("models", "alpha", "batching"), {"max_batch_size": 0}),
            ["models.alpha.batching"],
            id="zero-batch-size",
        ),
        pytest.param(
            broken(("pools", "local", "nodes"), []),
            ["pools.local", "`nodes`", "`dns`"],
            id="empty-pool",
        ),
        pytest.param(
            broken(("providers", "holysheep"), {"base_url": "http://x"}),
            ["providers.holysheep", "'api_key_env'"],
            id="provider-without-key-env",
        ),
        pytest.param(
            {key: value for key, value in minimal().items() if key != "models"},
            ["catalog", "'models'"],
            id="missing-models",
        ),
    ],
)
def test_malformed_catalog_names_the_location(data: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_catalog(data, env={})

    for fragment in expected:
        assert fragment in str(caught.value)


def test_unreadable_and_non_mapping_files_fail_with_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read the model catalog"):
        load_catalog(missing, env={})

    listing = tmp_path / "list.yaml"
    listing.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError) as caught:
        load_catalog(listing, env={})
    assert str(listing) in str(caught.value)
    assert "mapping" in str(caught.value)

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("models: {alpha: [unclosed\n")
    with pytest.raises(ConfigError) as caught:
        load_catalog(bad_yaml, env={})
    assert str(bad_yaml) in str(caught.value)


TRITON = {"kind": "triton", "pool": "local", "model": "alpha_lm"}
HOSTED = {"kind": "hosted", "provider": "holysheep", "model": "alpha"}


def with_second_pool(data: dict[str, Any], **spec: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    data["pools"]["gpu-a"] = spec
    return data


def test_shipped_catalog_declares_placement_queue_and_tenant_policy() -> None:
    catalog = load_catalog(DEFAULT_CATALOG, env={})

    tiny = catalog.models["shepherd-tiny"]
    assert tiny.deployments[0].memory_mb == 512
    assert tiny.deployments[0].max_nodes == 2
    assert tiny.deployments[0].memory_mb <= catalog.pools["local"].gpu_memory_mb
    assert tiny.queue == QueuePolicy(max_size=1024, aging_s=2.0)
    assert catalog.pools["local"].model_control == "explicit"
    assert catalog.tenant("regulated-health").self_hosted_only is True
    for model in catalog.models.values():
        assert all(d.kind == "hosted" for d in model.deployments[1:]), model.name


def test_queue_policy_defaults_are_inherited_and_overridable() -> None:
    data = minimal()
    data["defaults"]["queue"] = {"max_size": 64}
    data["models"]["beta"]["queue"] = {"aging_s": 0.5}

    catalog = parse_catalog(data, env={})

    assert catalog.models["alpha"].queue == QueuePolicy(max_size=64, aging_s=2.0)
    assert catalog.models["beta"].queue == QueuePolicy(max_size=64, aging_s=0.5)
    assert parse_catalog(minimal(), env={}).models["alpha"].queue == QueuePolicy(
        max_size=1024, aging_s=2.0
    )


def test_preferred_batch_sizes_are_sorted_and_deduplicated() -> None:
    data = broken(
        ("models", "alpha", "batching"), {"max_batch_size": 8, "preferred_batch_sizes": [8, 2, 8]}
    )
    assert parse_catalog(data, env={}).models["alpha"].batching.preferred_batch_sizes == (2, 8)


def test_tenants_have_policies_and_unknown_tenants_get_defaults() -> None:
    data = minimal()
    data["tenants"] = {"clinic": {"self_hosted_only": True}, "shop": None}

    catalog = parse_catalog(data, env={})

    assert catalog.tenant("clinic") == Tenant(name="clinic", self_hosted_only=True)
    assert catalog.tenant("shop") == Tenant(name="shop", self_hosted_only=False)
    assert catalog.tenant("stranger") == Tenant(name="stranger", self_hosted_only=False)
    assert parse_catalog(minimal(), env={}).tenant("clinic").self_hosted_only is False


def test_pool_settings_and_their_defaults() -> None:
    data = with_second_pool(
        minimal(),
        dns="triton.gpu.svc:8001",
        model_control="none",
        gpu_memory_mb=81_920,
        metrics_port=8002,
        max_inflight_batches=4,
    )

    catalog = parse_catalog(data, env={})

    assert catalog.pools["gpu-a"] == Pool(
        name="gpu-a",
        nodes=(),
        dns="triton.gpu.svc:8001",
        model_control="none",
        gpu_memory_mb=81_920,
        metrics_port=8002,
        max_inflight_batches=4,
    )
    assert catalog.pools["local"] == Pool(
        name="local",
        nodes=("127.0.0.1:8001",),
        dns="",
        model_control="explicit",
        gpu_memory_mb=16_384,
        metrics_port=0,
        max_inflight_batches=2,
    )


def test_pool_dns_comes_from_env_and_a_node_list_override_replaces_it() -> None:
    data = with_second_pool(minimal(), dns="triton.gpu.svc:8001")

    dns = parse_catalog(data, env={"SHEPHERD_POOL_GPU_A_DNS": "triton.other.svc:9001"})
    assert dns.pools["gpu-a"].dns == "triton.other.svc:9001"
    assert dns.pools["gpu-a"].nodes == ()

    from_env_only = parse_catalog(minimal(), env={"SHEPHERD_POOL_LOCAL_DNS": "t.svc:8001"})
    assert from_env_only.pools["local"].dns == "t.svc:8001"

    nodes = parse_catalog(data, env={"SHEPHERD_POOL_GPU_A_NODES": "10.0.0.1:8001"})
    assert nodes.pools["gpu-a"].nodes == ("10.0.0.1:8001",)
    assert nodes.pools["gpu-a"].dns == ""


def test_triton_deployment_memory_and_node_count() -> None:
    data = broken(
        ("models", "alpha", "deployments"),
        [dict(TRITON, memory_mb=2048, max_nodes=3), HOSTED],
    )

    alpha = parse_catalog(data, env={}).models["alpha"]

    assert (alpha.deployments[0].memory_mb, alpha.deployments[0].max_nodes) == (2048, 3)
    assert [d.kind for d in alpha.self_hosted] == ["triton"]
    assert [d.name for d in alpha.hosted] == ["holysheep/alpha"]
    plain = parse_catalog(minimal(), env={}).models["alpha"].deployments[0]
    assert (plain.memory_mb, plain.max_nodes) == (0, 1)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            broken(
                ("models", "alpha", "batching"),
                {"max_batch_size": 8, "preferred_batch_sizes": [4, 16]},
            ),
            ["models.alpha.batching.preferred_batch_sizes", "[16]", "max_batch_size (8)"],
            id="preferred-above-max",
        ),
        pytest.param(
            broken(("models", "alpha", "batching"), {"preferred_batch_sizes": [0, 2]}),
            ["models.alpha.batching.preferred_batch_sizes", "[0]"],
            id="preferred-zero",
        ),
        pytest.param(
            broken(("models", "alpha", "deployments"), [TRITON, dict(TRITON, name="again")]),
            ["models.alpha.deployments", "one Triton deployment"],
            id="two-triton-deployments",
        ),
        pytest.param(
            broken(("models", "alpha", "deployments"), [HOSTED, TRITON]),
            ["models.alpha.deployments", "must come first"],
            id="triton-after-hosted",
        ),
        pytest.param(
            broken(("models", "alpha", "deployments"), [dict(TRITON, memory_mb=20_000)]),
            ["models.alpha.deployments[0].memory_mb", "20000", "16384", "'local'"],
            id="memory-larger-than-a-node",
        ),
        pytest.param(
            broken(("models", "alpha", "deployments"), [dict(TRITON, memory_mb=-1)]),
            ["models.alpha.deployments[0].memory_mb", "-1"],
            id="negative-memory",
        ),
        pytest.param(
            broken(("models", "alpha", "deployments"), [dict(TRITON, max_nodes=0)]),
            ["models.alpha.deployments[0].max_nodes", "at least 1"],
            id="zero-max-nodes",
        ),
        pytest.param(
            broken(("models", "alpha", "queue"), {"aging_s": 0}),
            ["models.alpha.queue.aging_s", "above 0"],
            id="zero-aging",
        ),
        pytest.param(
            broken(("models", "alpha", "queue"), {"aging_s": -1}),
            ["models.alpha.queue.aging_s"],
            id="negative-aging",
        ),
        pytest.param(
            broken(("models", "alpha", "queue"), {"max_size": 0}),
            ["models.alpha.queue.max_size", "at least 1"],
            id="zero-queue-size",
        ),
        pytest.param(
            broken(("pools", "local"), {"dns": "triton.gpu.svc"}),
            ["pools.local.dns", "'triton.gpu.svc'", "name:port"],
            id="dns-without-port",
        ),
        pytest.param(
            broken(("pools", "local"), None),
            ["pools.local", "`nodes`", "`dns`"],
            id="pool-without-nodes-or-dns",
        ),
        pytest.param(
            broken(("pools", "local", "model_control"), "auto"),
            ["pools.local.model_control", "'auto'"],
            id="unknown-model-control",
        ),
        pytest.param(
            broken(("pools", "local", "gpu_memory_mb"), 0),
            ["pools.local.gpu_memory_mb", "at least 1"],
            id="zero-gpu-memory",
        ),
        pytest.param(
            broken(("pools", "local", "max_inflight_batches"), 0),
            ["pools.local.max_inflight_batches", "at least 1"],
            id="zero-inflight-batches",
        ),
    ],
)
def test_invalid_placement_and_queue_settings_name_the_location(
    data: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_catalog(data, env={})

    for fragment in expected:
        assert fragment in str(caught.value)


def test_memory_check_uses_the_pools_own_node_size() -> None:
    data = broken(("pools", "local", "gpu_memory_mb"), 40_000)
    data["models"]["alpha"]["deployments"] = [dict(TRITON, memory_mb=20_000)]

    assert parse_catalog(data, env={}).models["alpha"].deployments[0].memory_mb == 20_000


def test_pool_gpu_cost_is_exact_nano_usd_per_gpu_microsecond() -> None:
    data = with_second_pool(
        minimal(), nodes=["10.0.0.1:8001"], gpu_hour_usd="4.00", gpus_per_node=8
    )
    pool = parse_catalog(data, env={}).pools["gpu-a"]

    assert (pool.gpu_hour_nano, pool.gpus_per_node) == (4_000_000_000, 8)
    # An hour of one GPU is the hourly price; a microsecond rounds half up, once.
    assert pool.gpu_cost_nano(3_600_000_000) == 4_000_000_000
    assert pool.gpu_cost_nano(1_000_000) == 1_111_111  # 1 s: 1,111,111.1 nano-USD
    assert pool.gpu_cost_nano(9) == 10  # 9 us: 10.0 nano-USD
    assert pool.gpu_cost_nano(1) == 1  # 1.11 rounds down to 1
    # The shipped pool states its price, and a pool that gives none costs nothing.
    shipped = load_catalog(DEFAULT_CATALOG, env={}).pools["local"]
    assert shipped.gpu_hour_nano > 0 and shipped.gpus_per_node == 1
    local = parse_catalog(minimal(), env={}).pools["local"]
    assert (local.gpu_hour_nano, local.gpus_per_node, local.gpu_cost_nano(10**9)) == (0, 1, 0)


def test_hosted_price_is_the_models_own_hosted_deployment_else_its_familys() -> None:
    data = minimal()
    own_price = {"input_usd_per_million": "0.50", "output_usd_per_million": "1.50"}
    data["models"]["alpha"]["deployments"] = [
        TRITON,
        {**HOSTED, "price": own_price},
    ]
    data["models"]["gamma"] = {
        "family": "beta",
        "price": {"input_usd_per_million": "0.01", "output_usd_per_million": "0.02"},
        "deployments": [{"kind": "triton", "pool": "local", "model": "gamma_lm", "gpus": 1}],
    }
    data["models"]["delta"] = {
        "price": {"input_usd_per_million": "0.01", "output_usd_per_million": "0.02"},
        "deployments": [{"kind": "triton", "pool": "local", "model": "delta_lm"}],
    }
    catalog = parse_catalog(data, env={})

    # alpha's hosted deployment says what the provider charges: that, not alpha's price.
    assert catalog.hosted_price(catalog.models["alpha"]) == Price(500_000_000, 1_500_000_000)
    # gamma has no hosted deployment; beta, of the same family, is hosted at beta's price.
    assert catalog.hosted_price(catalog.models["gamma"]) == catalog.models["beta"].price
    assert catalog.hosted_price(catalog.models["beta"]) == catalog.models["beta"].price
    # delta has nothing hosted to compare with.
    assert catalog.hosted_price(catalog.models["delta"]) is None
    assert catalog.deployment(catalog.models["alpha"], "holysheep/alpha") is not None
    assert catalog.deployment(catalog.models["alpha"], "elsewhere") is None


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("pools", "local", "gpu_hour_usd"), "-3", ["pools.local.gpu_hour_usd", "non-negative"]),
        (("pools", "local", "gpu_hour_usd"), "cheap", ["pools.local.gpu_hour_usd", "decimal"]),
        (("pools", "local", "gpus_per_node"), 0, ["pools.local.gpus_per_node", "at least 1"]),
        (
            ("models", "alpha", "deployments", "0", "gpus"),
            2,
            ["models.alpha.deployments[0].gpus", "1 GPUs per node"],
        ),
        (
            ("models", "beta", "deployments", "0", "price"),
            {"input_usd_per_million": "1"},
            ["models.beta.deployments[0].price", "'output_usd_per_million'"],
        ),
    ],
)
def test_invalid_gpu_costs_name_the_location(
    path: tuple[str, ...], value: object, expected: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_catalog(broken(path, value), env={})
    for fragment in expected:
        assert fragment in str(caught.value)


def test_a_model_may_name_the_hosted_model_it_is_compared_with() -> None:
    data = minimal()
    data["models"]["alpha"]["hosted_equivalent"] = "beta"
    catalog = parse_catalog(data, env={})
    assert catalog.hosted_price(catalog.models["alpha"]) == catalog.models["beta"].price
    shipped = load_catalog(DEFAULT_CATALOG, env={})
    deepseek = shipped.models["deepseek-v3.2"].price
    assert shipped.hosted_price(shipped.models["shepherd-tiny"]) == deepseek
    with pytest.raises(ConfigError) as caught:
        parse_catalog(broken(("models", "beta", "hosted_equivalent"), "alpha"), env={})
    assert "models.beta.hosted_equivalent" in str(caught.value)
    assert "with a hosted deployment" in str(caught.value)


# -- embeddings and ensembles ----------------------------------------------------------------

STEPS = [{"model": "embed_lm", "memory_mb": 128}, {"model": "gen_lm", "memory_mb": 512}]


def test_shipped_catalog_has_an_embedding_model_and_a_rag_ensemble() -> None:
    catalog = load_catalog(DEFAULT_CATALOG, env={})

    embed = catalog.resolve("embed")
    assert (embed.name, embed.task, embed.family) == (
        "shepherd-embed",
        "embedding",
        "shepherd-embed",
    )
    assert embed.price.input_nano_per_million == 10_000_000
    assert embed.price.cost_nano(1_000_000, 0) == 10_000_000
    rag = catalog.resolve("rag")
    assert rag.task == "chat"
    ensemble = rag.deployments[0]
    assert ensemble.backend_model == "rag_tiny"
    assert [s.model for s in ensemble.steps] == [
        "rag_query",
        "embed_tiny",
        "vector_search",
        "rag_prompt",
        "tiny_lm",
    ]
    assert ensemble.footprint_mb == 8 + 8 + 128 + 64 + 8 + 512
    # A step is declared with the memory its own deployment declares.
    memory = {d.backend_model: d.memory_mb for m in catalog.models.values() for d in m.deployments}
    assert all(memory.get(s.model, s.memory_mb) == s.memory_mb for s in ensemble.steps)
    assert all(m.task == "chat" for m in catalog.models.values() if m is not embed)


def test_an_ensemble_declares_its_steps_in_order_with_their_memory() -> None:
    data = broken(
        ("models", "alpha", "deployments"), [dict(TRITON, memory_mb=4, steps=STEPS), HOSTED]
    )
    data["models"]["alpha"]["context_tokens"] = 200

    alpha = parse_catalog(data, env={}).models["alpha"]

    assert [(s.model, s.memory_mb) for s in alpha.deployments[0].steps] == [
        ("embed_lm", 128),
        ("gen_lm", 512),
    ]
    assert alpha.deployments[0].footprint_mb == 4 + 128 + 512
    assert alpha.context_tokens == 200
    assert parse_catalog(minimal(), env={}).models["alpha"].deployments[0].steps == ()
    assert parse_catalog(minimal(), env={}).models["alpha"].context_tokens == 0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(
            {"deployments": [dict(TRITON, steps={"embed_lm": 1})]},
            ["models.alpha.deployments[0].steps", "list", "step order", "memory_mb"],
            id="steps-not-a-list",
        ),
        pytest.param(
            {"deployments": [dict(TRITON, steps=[{"model": "embed_lm", "memory_mb": -1}])]},
            ["models.alpha.deployments[0].steps[0].memory_mb", "-1"],
            id="negative-step-memory",
        ),
        pytest.param(
            {"deployments": [dict(TRITON, steps=[{"model": "alpha_lm", "memory_mb": 1}])]},
            ["models.alpha.deployments[0].steps[0].model", "'alpha_lm'"],
            id="ensemble-is-its-own-step",
        ),
        pytest.param(
            {
                "deployments": [
                    dict(TRITON, memory_mb=16_000, steps=[{"model": "e_lm", "memory_mb": 1000}])
                ]
            },
            ["models.alpha.deployments[0].memory_mb", "17000", "with its steps", "16384"],
            id="steps-do-not-fit",
        ),
        pytest.param(
            {"deployments": [dict(HOSTED, steps=[{"model": "embed_lm"}])]},
            ["models.alpha.deployments[0].steps", "only a Triton ensemble"],
            id="hosted-with-steps",
        ),
        pytest.param(
            {"deployments": [dict(TRITON, steps=[{"model": "e_lm"}, {"model": "e_lm"}])]},
            ["models.alpha.deployments[0].steps", "listed once"],
            id="step-twice",
        ),
        pytest.param(
            {"deployments": [dict(TRITON, steps=[{"model": "e_lm", "gpu": 1}])]},
            ["models.alpha.deployments[0].steps[0]", "{model: <Triton model>, memory_mb: <MB>}"],
            id="unknown-step-key",
        ),
        pytest.param(
            {"task": "rerank"},
            ["models.alpha.task", "'chat' or 'embedding'", "'rerank'"],
            id="unknown-task",
        ),
        pytest.param(
            {"task": "embedding", "deployments": [TRITON, HOSTED]},
            ["models.alpha.deployments", "embedding model runs on Triton only"],
            id="hosted-embeddings",
        ),
        pytest.param(
            {"context_tokens": -5},
            ["models.alpha.context_tokens", "at least 0"],
            id="negative-context",
        ),
        pytest.param(
            {"task": "embedding", "family": "beta"},
            ["models.", "family", "'beta'", "chat and embedding models need families"],
            id="embedding-shares-a-chat-family",
        ),
    ],
)
def test_invalid_embedding_and_ensemble_settings_name_the_location(
    change: dict[str, Any], expected: list[str]
) -> None:
    data = copy.deepcopy(minimal())
    data["models"]["alpha"].update(change)
    with pytest.raises(ConfigError) as caught:
        parse_catalog(data, env={})
    for fragment in expected:
        assert fragment in str(caught.value)
