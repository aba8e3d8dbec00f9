"""Settings read from the environment: tokens name principals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings

A, B = "a" * 20, "b" * 20


def test_tokens_name_their_principals_and_bare_tokens_get_a_digest_name(tmp_path) -> None:
    s = Settings(home=tmp_path, api_tokens=f"alice:{A}, {B}")  # type: ignore[arg-type]
    names = s.principals
    assert names[A] == "alice"
    assert names[B].startswith("token-")
    assert B not in names[B]


@pytest.mark.parametrize(
    ("tokens", "rule"),
    [
        ("alice:short", "at least 16 characters"),
        (f"bad name:{A}", "must match"),
        (f"alice:{A},bob:{A}", "one token twice"),
    ],
)
def test_bad_tokens_are_refused_naming_the_rule(tmp_path, tokens: str, rule: str) -> None:
    with pytest.raises(ValidationError, match=rule):
        Settings(home=tmp_path, api_tokens=tokens)  # type: ignore[arg-type]
