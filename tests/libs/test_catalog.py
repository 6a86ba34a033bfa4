"""The model catalog: the shipped file, alias resolution, exact prices and config errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import grpc
import pytest

from libs.catalog import Price, load_catalog, parse_catalog, usd_to_nano
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
            ["pools.local", "at least one node"],
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
