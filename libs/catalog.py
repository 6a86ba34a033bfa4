"""The model catalog: public model names and aliases, prices, batching and deployments.

The catalog is the one place that says which public model runs where. The router resolves
aliases with it, the scheduler finds deployments and batching settings in it, the cache reads
model families from it and billing reads prices from it, so all four load the same YAML file
(`deploy/catalog.yaml` by default, `SHEPHERD_CATALOG` to override).

Prices are exact: "8.00" US dollars per million tokens becomes 8_000_000_000 nano-dollars per
million tokens, and a request's cost is an integer number of nano-dollars. So is what
self-hosted capacity costs: a pool's `gpu_hour_usd` becomes nano-dollars per GPU-hour, and a
request's GPU cost is its GPU microseconds at that rate, rounded once.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import grpc
import yaml

from libs.config import ConfigError
from libs.errors import ShepherdError

NANO_PER_USD = 1_000_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000
US_PER_HOUR = 3_600_000_000
# A price cap that keeps every cost and total far inside int64 nano-USD (Money, HINCRBY).
MAX_PRICE_USD = Decimal(1_000_000)

DeploymentKind = Literal["triton", "hosted"]
# What a model does: answer chats (Chat, ChatStream) or embed texts (Embed).
ModelTask = Literal["chat", "embedding"]


@dataclass(frozen=True)
class Price:
    """Prices in integer nano-USD per million tokens."""

    input_nano_per_million: int
    output_nano_per_million: int

    def cost_nano(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The cost of one request in nano-USD, rounded half up once, per request."""
        numerator = (
            prompt_tokens * self.input_nano_per_million
            + completion_tokens * self.output_nano_per_million
        )
        return (numerator + TOKENS_PER_PRICE_UNIT // 2) // TOKENS_PER_PRICE_UNIT


@dataclass(frozen=True)
class Batching:
    """Dynamic batching settings of one model."""

    max_batch_size: int
    max_queue_delay_ms: float
    preferred_batch_sizes: tuple[int, ...]


@dataclass(frozen=True)
class QueuePolicy:
    """How a model's queue admits, orders and sheds requests.

    `max_size` bounds the queue so overload is answered at once instead of after a long wait.
    `aging_s` is how long a request waits before it is ranked one priority class higher, so
    low-priority work is delayed under load but never starved.
    """

    max_size: int
    aging_s: float


@dataclass(frozen=True)
class Step:
    """One model an ensemble runs, and the GPU memory one loaded copy of it takes."""

    model: str
    memory_mb: int


@dataclass(frozen=True)
class Deployment:
    """One place a model can run: a Triton model on a node pool, or a hosted API model.

    A Triton deployment declares the GPU memory one loaded copy takes (`memory_mb`), so the
    scheduler can place it on a node with room, and `max_nodes`, how many nodes may hold a
    copy at once when the model is hot.
    """

    name: str
    kind: DeploymentKind
    backend_model: str
    pool: str = ""
    provider: str = ""
    memory_mb: int = 0
    max_nodes: int = 1
    # Triton: the GPUs one loaded copy runs on (tensor parallelism), so one microsecond of its
    # execution is `gpus` GPU-microseconds.
    gpus: int = 1
    # Hosted: what the provider charges per token, when it differs from the model's price
    # (what tenants are billed); None means the model's price.
    price: Price | None = None
    # "scheduler": Shepherd forms batches (Triton's dynamic batching rules); "engine": the
    # backend batches continuously inside its engine (vLLM, TensorRT-LLM on Triton) and wants
    # one request per sequence, so each request is sent on its own, bounded by the pool's
    # max_inflight_batches per node.
    batching: Literal["scheduler", "engine"] = "scheduler"
    # A Triton ensemble's composing models, in step order: Triton loads them with the ensemble
    # (explicit model control), so placement needs room for those a node lacks, and never
    # evicts one while a batch of the ensemble runs. `memory_mb` is the ensemble's own.
    steps: tuple[Step, ...] = ()

    @property
    def footprint_mb(self) -> int:
        """The memory the deployment takes on a node that holds none of its models yet."""
        return self.memory_mb + sum(step.memory_mb for step in self.steps)


@dataclass(frozen=True)
class Model:
    """One canonical public model.

    `priority` ranks models that compete for the same capacity: 1 is served first (the seed
    puts gpt-4.1 first and deepseek-v3.2 last).
    """

    name: str
    aliases: tuple[str, ...]
    family: str
    priority: int
    price: Price
    default_max_tokens: int
    max_output_tokens: int
    batching: Batching
    queue: QueuePolicy
    cache_ttl_s: int
    deployments: tuple[Deployment, ...]
    # "tenant": answers are cached per tenant (or tenant cache group), the safe default;
    # "shared": every tenant shares the family's answers, the seeds' "shared inference".
    cache_scope: CacheScope = "tenant"
    # The hosted model whose price this model's self-hosted tokens are compared with in cost
    # reports, when it names one; otherwise its own or its family's hosted deployment.
    hosted_equivalent: str = ""
    # "chat" (Chat, ChatStream) or "embedding" (Embed, priced per input token).
    task: ModelTask = "chat"
    # Prompt tokens a deployment adds to each request's own (a RAG model's retrieved
    # documents), at most: admission reserves them, since the backend counts and bills them.
    context_tokens: int = 0

    @property
    def self_hosted(self) -> tuple[Deployment, ...]:
        """The Triton deployments, where data never leaves Shepherd's own nodes."""
        return tuple(d for d in self.deployments if d.kind == "triton")

    @property
    def hosted(self) -> tuple[Deployment, ...]:
        """The hosted API deployments, the spill-over targets when GPUs would be too late."""
        return tuple(d for d in self.deployments if d.kind == "hosted")


ModelControl = Literal["explicit", "none"]


@dataclass(frozen=True)
class Pool:
    """A set of Triton nodes and what Shepherd may assume about each.

    Nodes come from a static list of gRPC `host:port` addresses, or from `dns` (`name:port`),
    re-resolved periodically so that a Kubernetes headless service works. With
    `model_control: explicit` Shepherd loads and unloads models itself, fitting them into
    `gpu_memory_mb` per node; with `none` every node is assumed to serve every model it
    reports ready. `metrics_port`, when set, lets a node's own nv_gpu_memory_total_bytes
    metric replace the configured memory.

    `gpu_hour_nano` and `gpus_per_node` say what the pool costs whether it is busy or not:
    reports turn the GPU time attributed to requests into money with them, and measure the
    pool's utilisation against its wall time times its GPUs.
    """

    name: str
    nodes: tuple[str, ...]
    dns: str = ""
    model_control: ModelControl = "explicit"
    gpu_memory_mb: int = 16_384
    metrics_port: int = 0
    max_inflight_batches: int = 2
    # What one GPU of the pool costs per hour (rent or amortised purchase plus power), in
    # nano-USD, and how many GPUs one node has: what self-hosted work really costs.
    gpu_hour_nano: int = 0
    gpus_per_node: int = 1

    def gpu_cost_nano(self, gpu_us: int) -> int:
        """The cost of `gpu_us` GPU-microseconds in nano-USD, rounded half up once."""
        return (gpu_us * self.gpu_hour_nano + US_PER_HOUR // 2) // US_PER_HOUR


CacheScope = Literal["tenant", "shared"]


@dataclass(frozen=True)
class Tenant:
    """Per-tenant policy from the catalog.

    `self_hosted_only` is the seed's data-sovereignty case: this tenant's prompts must never
    leave self-hosted nodes, so its requests are never spilled to a hosted API, nor answered
    from a cache entry a hosted API produced.

    `weight` is the tenant's share of a model's capacity when tenants compete within one
    priority class (weighted fair share): a tenant of weight 2 is served twice the tokens of
    a tenant of weight 1 while both have work queued.

    `cache_group` names a group of tenants that share cached answers with each other (for
    example the teams of one company); a tenant without one has a cache of its own.
    """

    name: str
    self_hosted_only: bool = False
    weight: int = 1
    cache_group: str = ""

    @property
    def cache_namespace(self) -> str:
        """The cache namespace of this tenant's private answers: its group's, or its own."""
        return f"group:{self.cache_group}" if self.cache_group else f"tenant:{self.name}"


@dataclass(frozen=True)
class Provider:
    """A hosted OpenAI-compatible API and the environment variable holding its key."""

    name: str
    base_url: str
    api_key_env: str


@dataclass(frozen=True)
class Catalog:
    """The parsed, validated catalog."""

    models: Mapping[str, Model]
    aliases: Mapping[str, str]
    pools: Mapping[str, Pool]
    providers: Mapping[str, Provider]
    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    # The cache scope of each model family (families are checked to agree at parse time).
    cache_scopes: Mapping[str, CacheScope] = field(default_factory=dict)

    def family_cache_scope(self, family: str) -> CacheScope:
        """Whether a family's answers are cached per tenant (the default) or shared."""
        return self.cache_scopes.get(family, "tenant")

    def hosted_price(self, model: Model) -> Price | None:
        """What the same tokens would cost on the hosted API: the price of the hosted model the
        model names (`hosted_equivalent`), else of its own hosted deployment, else of a hosted
        deployment of another model of its family (a self-hosted fine-tune compared with the
        hosted model it replaces); None if there is none. A hosted deployment without a price
        of its own charges its model's price."""
        named = self.models.get(model.hosted_equivalent)
        candidates = [
            *([named] if named is not None else []),
            model,
            *(m for m in self.models.values() if m.family == model.family),
        ]
        for candidate in candidates:
            for deployment in candidate.hosted:
                return deployment.price or candidate.price
        return None

    def deployment(self, model: Model, name: str) -> Deployment | None:
        """The deployment of `model` called `name`, or None."""
        return next((d for d in model.deployments if d.name == name), None)

    def tenant(self, name: str) -> Tenant:
        """The policy of a tenant; tenants the catalog does not name get the defaults."""
        return self.tenants.get(name) or Tenant(name=name)

    def resolve(self, name: str) -> Model:
        """Return the model a public name or alias refers to, or NOT_FOUND with suggestions."""
        key = name.strip().lower()
        canonical = self.aliases.get(key)
        if canonical is None:
            known = sorted(self.aliases)
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ShepherdError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(self.models))}"
                " (call ListModels for aliases).",
            )
        return self.models[canonical]


def usd_to_nano(value: Any, where: str) -> int:
    """Convert a decimal USD amount written as a string to exact integer nano-USD."""
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"{where}: {value!r} is not a decimal amount of US dollars") from None
    if not amount.is_finite() or amount > MAX_PRICE_USD:
        raise ConfigError(f"{where}: {value!r} must be a finite amount of at most {MAX_PRICE_USD}")
    nano = amount * NANO_PER_USD
    if nano != nano.to_integral_value() or nano < 0:
        raise ConfigError(
            f"{where}: {value!r} must be a non-negative amount with at most 9 decimals"
        )
    return int(nano)


def _require(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        raise ConfigError(f"{where}: missing required key {key!r}")
    return mapping[key]


def _positive(mapping: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = int(mapping.get(key, default))
    if value < 1:
        raise ConfigError(f"{where}.{key}: must be at least 1, not {value}")
    return value


def _price(spec: Mapping[str, Any], where: str) -> Price:
    """A price per million input and output tokens, as exact nano-USD."""
    return Price(
        input_nano_per_million=usd_to_nano(_require(spec, "input_usd_per_million", where), where),
        output_nano_per_million=usd_to_nano(_require(spec, "output_usd_per_million", where), where),
    )


def _is_name(value: str) -> bool:
    return bool(value) and value.replace("-", "").replace("_", "").isalnum()


def _has_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit()


def _steps(spec: Any, ensemble: str, where: str) -> tuple[Step, ...]:
    """An ensemble's `steps`: its composing Triton models in step order, each with memory_mb."""
    if spec is None:
        return ()
    if not isinstance(spec, list) or not spec:
        raise ConfigError(
            f"{where}: a list of the ensemble's composing models in step order, each"
            " {model: <Triton model>, memory_mb: <MB>}"
        )
    steps = []
    for index, entry in enumerate(spec):
        step_where = f"{where}[{index}]"
        if not isinstance(entry, Mapping) or set(entry) - {"model", "memory_mb"}:
            raise ConfigError(f"{step_where}: {{model: <Triton model>, memory_mb: <MB>}}")
        name = str(_require(entry, "model", step_where))
        if not _is_name(name) or name == ensemble:
            raise ConfigError(
                f"{step_where}.model: {name!r} is not a Triton model name other than {ensemble!r}"
            )
        memory = entry.get("memory_mb", 0)
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
            raise ConfigError(
                f"{step_where}.memory_mb: must be a whole number >= 0, not {memory!r}"
            )
        steps.append(Step(name, memory))
    if len({step.model for step in steps}) != len(steps):
        raise ConfigError(f"{where}: each composing model is listed once")
    return tuple(steps)


def _env_name(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).upper()


def parse_catalog(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Catalog:
    """Validate raw catalog data; node lists and base URLs can be overridden from `env`.

    `SHEPHERD_POOL_<POOL>_NODES=host:port,...` replaces a pool's nodes (the local launcher and
    tests use it for their ephemeral ports) and `SHEPHERD_PROVIDER_<NAME>_BASE_URL` replaces a
    provider's URL.
    """
    env = os.environ if env is None else env
    pools: dict[str, Pool] = {}
    for name, spec in (data.get("pools") or {}).items():
        spec = spec or {}
        where = f"pools.{name}"
        override = env.get(f"SHEPHERD_POOL_{_env_name(name)}_NODES", "")
        dns = env.get(f"SHEPHERD_POOL_{_env_name(name)}_DNS", "") or str(spec.get("dns", ""))
        if override:
            nodes = [n.strip() for n in override.split(",") if n.strip()]
            dns = ""
        else:
            nodes = [str(n) for n in spec.get("nodes") or ()]
        if not nodes and not dns:
            raise ConfigError(f"{where}: give `nodes` (host:port addresses) or `dns` (name:port)")
        if dns and not _has_port(dns):
            raise ConfigError(f"{where}.dns: {dns!r} must be name:port, e.g. triton.ns.svc:8001")
        control = str(spec.get("model_control", "explicit"))
        if control not in ("explicit", "none"):
            raise ConfigError(f"{where}.model_control: 'explicit' or 'none', not {control!r}")
        pools[name] = Pool(
            name=name,
            nodes=tuple(nodes),
            dns=dns,
            model_control=control,  # type: ignore[arg-type]
            gpu_memory_mb=_positive(spec, "gpu_memory_mb", 16_384, where),
            metrics_port=int(spec.get("metrics_port", 0)),
            max_inflight_batches=_positive(spec, "max_inflight_batches", 2, where),
            gpu_hour_nano=usd_to_nano(spec.get("gpu_hour_usd", "0"), f"{where}.gpu_hour_usd"),
            gpus_per_node=_positive(spec, "gpus_per_node", 1, where),
        )
    tenants: dict[str, Tenant] = {}
    for name, spec in (data.get("tenants") or {}).items():
        spec = spec or {}
        where = f"tenants.{name}"
        unknown = set(spec) - {"self_hosted_only", "weight", "cache_group"}
        if unknown:
            raise ConfigError(
                f"{where}: unknown keys {sorted(unknown)}; a tenant may set self_hosted_only,"
                " weight and cache_group (budgets and rate limits are set with AdminService)"
            )
        group = str(spec.get("cache_group", ""))
        if group and not _is_name(group):
            raise ConfigError(f"{where}.cache_group: {group!r} must be letters, digits, '-' or '_'")
        tenants[str(name)] = Tenant(
            name=str(name),
            self_hosted_only=bool(spec.get("self_hosted_only")),
            weight=_positive(spec, "weight", 1, where),
            cache_group=group,
        )
    providers: dict[str, Provider] = {}
    for name, spec in (data.get("providers") or {}).items():
        where = f"providers.{name}"
        base_url = env.get(f"SHEPHERD_PROVIDER_{_env_name(name)}_BASE_URL", "") or _require(
            spec, "base_url", where
        )
        providers[name] = Provider(
            name=name,
            base_url=str(base_url).rstrip("/"),
            api_key_env=str(_require(spec, "api_key_env", where)),
        )

    defaults = data.get("defaults") or {}
    models: dict[str, Model] = {}
    aliases: dict[str, str] = {}
    for name, spec in (_require(data, "models", "catalog") or {}).items():
        where = f"models.{name}"
        merged = {**defaults, **spec}
        batching_spec = {**(defaults.get("batching") or {}), **(spec.get("batching") or {})}
        price_spec = _require(merged, "price", where)
        deployments = []
        for index, dep in enumerate(_require(merged, "deployments", where)):
            dep_where = f"{where}.deployments[{index}]"
            kind = _require(dep, "kind", dep_where)
            if kind == "triton":
                pool = str(_require(dep, "pool", dep_where))
                if pool not in pools:
                    raise ConfigError(f"{dep_where}: unknown pool {pool!r}")
                backend_model = str(_require(dep, "model", dep_where))
                mode = str(dep.get("batching", "scheduler"))
                if mode not in ("scheduler", "engine"):
                    raise ConfigError(
                        f"{dep_where}.batching: 'scheduler' (Shepherd forms batches) or 'engine'"
                        f" (the backend batches inside its engine), not {mode!r}"
                    )
                deployment = Deployment(
                    name=str(dep.get("name", f"{pool}/{backend_model}")),
                    kind="triton",
                    backend_model=backend_model,
                    pool=pool,
                    memory_mb=int(dep.get("memory_mb", 0)),
                    max_nodes=_positive(dep, "max_nodes", 1, dep_where),
                    gpus=_positive(dep, "gpus", 1, dep_where),
                    batching=mode,  # type: ignore[arg-type]
                    steps=_steps(dep.get("steps"), backend_model, f"{dep_where}.steps"),
                )
                if deployment.gpus > pools[pool].gpus_per_node:
                    raise ConfigError(
                        f"{dep_where}.gpus: {deployment.gpus} must fit on one node of pool "
                        f"{pool!r} ({pools[pool].gpus_per_node} GPUs per node)"
                    )
                if not 0 <= deployment.footprint_mb <= pools[pool].gpu_memory_mb:
                    raise ConfigError(
                        f"{dep_where}.memory_mb: {deployment.footprint_mb} (with its steps) must"
                        f" fit in the {pools[pool].gpu_memory_mb} MB of one node of pool {pool!r}"
                    )
            elif kind == "hosted":
                if "steps" in dep:
                    raise ConfigError(f"{dep_where}.steps: only a Triton ensemble has steps")
                provider = str(_require(dep, "provider", dep_where))
                if provider not in providers:
                    raise ConfigError(f"{dep_where}: unknown provider {provider!r}")
                backend_model = str(_require(dep, "model", dep_where))
                deployment = Deployment(
                    name=str(dep.get("name", f"{provider}/{backend_model}")),
                    kind="hosted",
                    backend_model=backend_model,
                    provider=provider,
                    price=_price(dep["price"], f"{dep_where}.price") if "price" in dep else None,
                )
            else:
                raise ConfigError(f"{dep_where}: kind must be 'triton' or 'hosted', not {kind!r}")
            deployments.append(deployment)
        if not deployments:
            raise ConfigError(f"{where}: at least one deployment is required")
        triton_at = [i for i, d in enumerate(deployments) if d.kind == "triton"]
        if triton_at not in ([], [0]):
            raise ConfigError(
                f"{where}.deployments: a model may have one Triton deployment and it must come "
                "first; hosted deployments after it are its spill-over and fallback targets "
                "(put more nodes in the pool to add capacity)"
            )
        if deployments[0].batching == "engine":
            # One request per sequence: the engine batches continuously by itself.
            batching_spec = {"max_batch_size": 1, "max_queue_delay_ms": 0}
        batching = Batching(
            max_batch_size=int(batching_spec.get("max_batch_size", 8)),
            max_queue_delay_ms=float(batching_spec.get("max_queue_delay_ms", 50)),
            preferred_batch_sizes=tuple(
                sorted({int(s) for s in batching_spec.get("preferred_batch_sizes", ())})
            ),
        )
        if batching.max_batch_size < 1 or batching.max_queue_delay_ms < 0:
            raise ConfigError(f"{where}.batching: max_batch_size >= 1 and max_queue_delay_ms >= 0")
        bad_sizes = [
            s for s in batching.preferred_batch_sizes if not 1 <= s <= batching.max_batch_size
        ]
        if bad_sizes:
            raise ConfigError(
                f"{where}.batching.preferred_batch_sizes: {bad_sizes} must lie between 1 and "
                f"max_batch_size ({batching.max_batch_size})"
            )
        queue_spec = {**(defaults.get("queue") or {}), **(spec.get("queue") or {})}
        queue = QueuePolicy(
            max_size=_positive(queue_spec, "max_size", 1024, f"{where}.queue"),
            aging_s=float(queue_spec.get("aging_s", 2.0)),
        )
        if queue.aging_s <= 0:
            raise ConfigError(f"{where}.queue.aging_s: must be above 0 seconds")
        task = str(merged.get("task", "chat"))
        if task not in ("chat", "embedding"):
            raise ConfigError(f"{where}.task: 'chat' or 'embedding', not {task!r}")
        context_tokens = int(merged.get("context_tokens", 0))
        if context_tokens < 0:
            raise ConfigError(f"{where}.context_tokens: must be at least 0, not {context_tokens}")
        if task == "embedding" and any(d.kind != "triton" for d in deployments):
            raise ConfigError(
                f"{where}.deployments: an embedding model runs on Triton only (Shepherd does not"
                " call hosted embedding APIs yet)"
            )
        if task == "embedding" and context_tokens:
            raise ConfigError(f"{where}.context_tokens: an embedding model adds no context")
        cache_scope = str(merged.get("cache_scope", "tenant"))
        if cache_scope not in ("tenant", "shared"):
            raise ConfigError(
                f"{where}.cache_scope: 'tenant' (answers cached per tenant) or 'shared' "
                f"(shared by every tenant of the family), not {cache_scope!r}"
            )
        model = Model(
            name=name,
            aliases=tuple(str(a) for a in merged.get("aliases", ())),
            family=str(merged.get("family", name)),
            priority=int(merged.get("priority", 5)),
            price=_price(price_spec, f"{where}.price"),
            default_max_tokens=int(merged.get("default_max_tokens", 256)),
            max_output_tokens=int(merged.get("max_output_tokens", 4096)),
            batching=batching,
            queue=queue,
            # 0: the cache service's default (SHEPHERD_CACHE_TTL_S).
            cache_ttl_s=int(merged.get("cache_ttl_s", 0)),
            deployments=tuple(deployments),
            cache_scope=cache_scope,  # type: ignore[arg-type]
            hosted_equivalent=str(merged.get("hosted_equivalent", "")),
            task=task,  # type: ignore[arg-type]
            context_tokens=context_tokens,
        )
        models[name] = model
        for key in (name, *model.aliases):
            key = key.lower()
            if key in aliases and aliases[key] != name:
                raise ConfigError(
                    f"{where}: name or alias {key!r} is already used by {aliases[key]!r}"
                )
            aliases[key] = name
    for model in models.values():
        named = models.get(model.hosted_equivalent)
        if model.hosted_equivalent and (named is None or not named.hosted):
            raise ConfigError(
                f"models.{model.name}.hosted_equivalent: {model.hosted_equivalent!r} must be a"
                " model of this catalog with a hosted deployment"
            )
    scopes: dict[str, tuple[str, CacheScope]] = {}
    tasks: dict[str, Model] = {}
    for model in models.values():
        if ":" in model.family:
            raise ConfigError(f"models.{model.name}.family: {model.family!r} must not contain ':'")
        other = tasks.setdefault(model.family, model)
        if other.task != model.task:
            raise ConfigError(
                f"models.{model.name}.family: {model.family!r} is also the family of"
                f" {other.name!r}, a {other.task} model; a family's cached answers are of one"
                " kind, so chat and embedding models need families of their own"
            )
        first = scopes.setdefault(model.family, (model.name, model.cache_scope))
        if first[1] != model.cache_scope:
            raise ConfigError(
                f"models.{model.name}.cache_scope: {model.cache_scope!r} differs from "
                f"{first[1]!r} of {first[0]!r}; models of family {model.family!r} share one "
                "cache, so they must agree on its scope"
            )
    return Catalog(
        models=models,
        aliases=aliases,
        pools=pools,
        providers=providers,
        tenants=tenants,
        cache_scopes={family: scope for family, (_, scope) in scopes.items()},
    )


def load_catalog(path: Path, env: Mapping[str, str] | None = None) -> Catalog:
    """Load and validate the catalog file; any problem fails start-up with its location."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read the model catalog {path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the model catalog {path} must be a YAML mapping")
    try:
        return parse_catalog(data, env)
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"the model catalog {path} is malformed: {error!r}") from None
