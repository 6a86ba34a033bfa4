"""What self-hosting cost, next to what the hosted API would have charged: the money side of
usage reports, and the cost advisor.

Per bucket (tenant × model × day) the ledger keeps the GPU time its requests were attributed
and what it cost at the pool's price (summed per request, each rounded once when billed), and
the prompt and completion tokens of the requests that ran on self-hosted nodes. The hosted
equivalent is those tokens at the hosted price (`Catalog.hosted_price`: the model's own hosted
deployment, else its family's), priced once over the bucket's tokens, so it equals tokens ×
hosted price to the nano-dollar; savings are that minus the GPU cost. Both are left unset for
a model that never runs self-hosted (its buckets have nothing to compare) and for one with
nothing hosted to compare with. Cache hits count in neither: a hit costs nothing on either
side.

The advisor answers the seeds' question with this deployment's own numbers: above what monthly
volume does self-hosting a model on its pool beat the hosted price? Self-hosting has a floor,
the smallest unit one can run (one node: its GPUs for a month, NODE_MONTH_HOURS), and beyond it
a cost per token: the GPU time a token takes (measured, from the ledger) divided by the pool's
utilisation (measured: idle GPU time is paid for too), at the pool's price. The hosted API
costs its price per token from the first token. So if a self-hosted token costs less than a
hosted one at the measured utilisation, self-hosting wins above the volume whose hosted bill
equals one node's monthly cost, and the pool keeps winning as it grows (nodes added at the
same utilisation); if not, it never wins at that utilisation, and the advisor says which
utilisation it would take.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from shepherd.billing.v1 import billing_pb2
from shepherd.common.v1 import common_pb2

from libs.accounts import Aggregate
from libs.catalog import US_PER_HOUR, Catalog
from services.billing.ledger import Bucket
from services.billing.pools import PoolHour

NODE_MONTH_HOURS = 730  # 8,760 hours a year over 12 months
MONTH_DAYS = 30
PER_MILLION = 1_000_000


def usage_of(totals: Aggregate) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=totals.prompt_tokens,
        completion_tokens=totals.completion_tokens,
        total_tokens=totals.prompt_tokens + totals.completion_tokens,
    )


def hosted_equivalent_nano(catalog: Catalog, model: str, usage: Aggregate) -> int | None:
    """The self-hosted tokens of `usage` at the model's hosted price; None without one."""
    found = catalog.models.get(model)
    price = catalog.hosted_price(found) if found is not None else None
    if price is None:
        return None
    return price.cost_nano(usage.self_hosted_prompt_tokens, usage.self_hosted_completion_tokens)


def bucket_pb(catalog: Catalog, bucket: Bucket) -> common_pb2.UsageBucket:
    """One report bucket: what was billed, what the GPU time cost, what hosted would have."""
    usage = bucket.usage
    result = common_pb2.UsageBucket(
        day=bucket.day,
        model=bucket.model,
        requests=usage.requests,
        usage=usage_of(usage),
        cost=common_pb2.Money(nano_usd=usage.cost_nano),
        cache_hits=usage.cache_hits,
        gpu_us=usage.gpu_us,
        gpu_cost=common_pb2.Money(nano_usd=usage.gpu_cost_nano),
        self_hosted_requests=usage.self_hosted_requests,
        self_hosted_usage=common_pb2.Usage(
            prompt_tokens=usage.self_hosted_prompt_tokens,
            completion_tokens=usage.self_hosted_completion_tokens,
            total_tokens=usage.self_hosted_prompt_tokens + usage.self_hosted_completion_tokens,
        ),
    )
    model = catalog.models.get(bucket.model)
    hosted = hosted_equivalent_nano(catalog, bucket.model, usage)
    if hosted is not None and (usage.self_hosted_requests or (model and model.self_hosted)):
        result.hosted_equivalent_cost.nano_usd = hosted
        result.savings.nano_usd = hosted - usage.gpu_cost_nano
    return result


def _summed(buckets: Iterable[Bucket]) -> dict[str, Aggregate]:
    """The buckets' figures per model, over all their days."""
    totals: dict[str, dict[str, int]] = {}
    for bucket in buckets:
        entry = totals.setdefault(bucket.model, {})
        for name in Aggregate.__dataclass_fields__:
            entry[name] = entry.get(name, 0) + getattr(bucket.usage, name)
    return {model: Aggregate(**values) for model, values in totals.items()}


def advice(
    catalog: Catalog, buckets: Iterable[Bucket], pools: Mapping[str, PoolHour], days: int
) -> list[billing_pb2.CostAdvice]:
    """The advisor (see above) for each self-hosted model in `buckets`, which cover `days`
    days; `pools` holds each pool's figures over the same days."""
    result = []
    for name, usage in sorted(_summed(buckets).items()):
        model = catalog.models.get(name)
        if model is None or not model.self_hosted:
            continue
        deployment = model.self_hosted[0]
        pool = catalog.pools[deployment.pool]
        measured = pools.get(pool.name)
        entry = billing_pb2.CostAdvice(
            model=name,
            pool=pool.name,
            utilisation=measured.utilisation if measured is not None else 0.0,
            node_monthly_cost=common_pb2.Money(
                nano_usd=pool.gpus_per_node * pool.gpu_hour_nano * NODE_MONTH_HOURS
            ),
            tokens_per_month=(usage.prompt_tokens + usage.completion_tokens) * MONTH_DAYS // days,
        )
        tokens = usage.self_hosted_prompt_tokens + usage.self_hosted_completion_tokens
        hosted = hosted_equivalent_nano(catalog, name, usage)
        missing = []
        if hosted is None:
            missing.append("the model has no hosted deployment to compare with")
        if not tokens or not usage.gpu_us:
            missing.append("no self-hosted tokens with GPU time were measured")
        if not entry.utilisation:
            missing.append("the pool's utilisation was not measured")
        if not pool.gpu_hour_nano:
            missing.append(f"pool {pool.name!r} has no gpu_hour_usd in the catalog")
        if missing or hosted is None or not hosted:
            entry.verdict = "cannot advise: " + "; ".join(missing or ["the hosted price is 0"])
            result.append(entry)
            continue
        entry.gpu_us_per_token = usage.gpu_us / tokens
        hosted_per_million = hosted * PER_MILLION // tokens
        # A token's GPU time over the utilisation (idle time is paid too), at the pool's price.
        self_per_million = round(
            entry.gpu_us_per_token
            * PER_MILLION
            * pool.gpu_hour_nano
            / (US_PER_HOUR * entry.utilisation)
        )
        entry.hosted_cost_per_million_tokens.nano_usd = hosted_per_million
        entry.self_hosted_cost_per_million_tokens.nano_usd = self_per_million
        entry.break_even_utilisation = entry.utilisation * self_per_million / hosted_per_million
        if self_per_million < hosted_per_million:
            entry.break_even_tokens_per_month = (
                entry.node_monthly_cost.nano_usd * PER_MILLION // hosted_per_million
            )
            now = (
                "cheaper"
                if entry.tokens_per_month > entry.break_even_tokens_per_month
                else ("dearer")
            )
            entry.verdict = (
                f"self-hosting beats the hosted price above {entry.break_even_tokens_per_month:,}"
                f" tokens a month at {entry.utilisation:.1%} utilisation; at this tenant's"
                f" {entry.tokens_per_month:,} tokens a month it is {now}"
            )
        else:
            entry.verdict = (
                f"at {entry.utilisation:.1%} utilisation a self-hosted token costs more than a"
                f" hosted one at any volume; self-hosting needs at least"
                f" {entry.break_even_utilisation:.1%} utilisation"
            )
        result.append(entry)
    return result
