"""Rendezvous ownership (libs/membership.py): the same owner everywhere, and few moves."""

from __future__ import annotations

from libs.membership import assignments, owner_of

MODELS = [f"model-{n}" for n in range(200)]
MEMBERS = [f"replica-{n}" for n in range(5)]


def test_the_owner_does_not_depend_on_the_order_members_are_listed_in() -> None:
    assert assignments(MODELS, MEMBERS) == assignments(MODELS, list(reversed(MEMBERS)))


def test_a_leaving_replica_moves_only_its_own_models_to_the_others() -> None:
    before = assignments(MODELS, MEMBERS)
    after = assignments(MODELS, MEMBERS[1:])
    moved = {m for m in MODELS if before[m] != after[m]}
    assert moved == {m for m in MODELS if before[m] == MEMBERS[0]}
    assert moved, "replica-0 owned some of 200 models"


def test_a_joining_replica_takes_models_only_for_itself() -> None:
    before = assignments(MODELS, MEMBERS)
    after = assignments(MODELS, [*MEMBERS, "replica-new"])
    assert {after[m] for m in MODELS if before[m] != after[m]} == {"replica-new"}


def test_every_replica_owns_some_models_and_none_without_members() -> None:
    owners = assignments(MODELS, MEMBERS)
    assert set(owners.values()) == set(MEMBERS)
    assert owner_of("model-0", []) is None
