"""Tenant names: what may become part of a Redis key."""

from __future__ import annotations

import pytest

from libs.apikeys import valid_tenant


@pytest.mark.parametrize("name", ["acme", "team-42_eu", "A" * 64])
def test_ascii_letters_digits_dashes_and_underscores_are_tenant_names(name: str) -> None:
    assert valid_tenant(name)


# Found by the fuzz (tests/fuzz): str.isalnum also accepts letters and digits of every script.
@pytest.mark.parametrize("name", ["", "A" * 65, "acme:admin", "a b", "café", "租户", "٣"])
def test_anything_else_is_not(name: str) -> None:
    assert not valid_tenant(name)
