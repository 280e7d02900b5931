"""Bearer tokens: the tokens file, constant-time authentication, rotation."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from shortline.common import auth
from shortline.common.auth import (
    ANONYMOUS,
    Tenant,
    TokensFileError,
    TokenStore,
    bearer_token,
    parse_authorization,
    parse_tokens,
)

ALPHA = "alpha-token-0123456789"
BETA = "beta-token-abcdefghij"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write(path: Path, text: str) -> Path:
    """Replaces the file atomically, as a rotation script would (a new inode)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


TWO = f"""
[[token]]
tenant = "team-a"
token = "{ALPHA}"

[[token]]
tenant = "team.b_2"
sha256 = "{sha(BETA)}"
models = ["replay"]
"""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_clear_and_sha256_entries_name_their_tenant_and_models(tmp_path: Path) -> None:
    store = TokenStore(write(tmp_path / "tokens.toml", TWO))
    assert store.authenticate(ALPHA) == Tenant("team-a", None)
    assert store.authenticate(BETA) == Tenant("team.b_2", frozenset({"replay"}))
    assert store.authenticate("nope") is None
    assert store.authenticate(ALPHA + "x") is None
    assert store.authenticate("") is None
    assert store.tenants == {"team-a", "team.b_2"} and len(store) == 2
    b = store.authenticate(BETA)
    assert b is not None and b.may_use("replay") and not b.may_use("smollm2-135m-instruct")
    # Length hints are granted explicitly (they order the queue); the anonymous
    # development tenant (no tokens file) may send them.
    assert not b.length_hints and ANONYMOUS.length_hints
    granted = parse_tokens('[[token]]\ntenant = "h"\ntoken = "t"\nlength_hints = true\n', "t")
    assert granted[0].tenant.length_hints


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[[token]\n", "not valid TOML"),
        ("", "has no [[token]] entries"),
        ('tenants = 1\n[[token]]\ntenant = "a"\ntoken = "t"\n', "unknown top-level key(s) tenants"),
        ('[[token]]\ntenant = "a/b"\ntoken = "t"\n', "entry 1: tenant must match"),
        ('[[token]]\ntenant = ""\ntoken = "t"\n', "entry 1: tenant must match"),
        (f'[[token]]\ntenant = "{"x" * 65}"\ntoken = "t"\n', "entry 1: tenant must match"),
        ('[[token]]\ntoken = "t"\n', "entry 1: tenant must match"),
        ('[[token]]\ntenant = "a"\n', "entry 1 (tenant 'a'): give exactly one of token and sha256"),
        (
            f'[[token]]\ntenant = "a"\ntoken = "t"\nsha256 = "{sha("t")}"\n',
            "give exactly one of token and sha256",
        ),
        ('[[token]]\ntenant = "a"\ntoken = ""\n', "token must be a non-empty string"),
        ('[[token]]\ntenant = "a"\ntoken = "two words"\n', "without spaces"),
        ('[[token]]\ntenant = "a"\nsha256 = "abc"\n', "sha256 must be 64 hex digits"),
        ('[[token]]\ntenant = "a"\ntoken = "t"\nmodels = []\n', "models must be a non-empty list"),
        ('[[token]]\ntenant = "a"\ntoken = "t"\nmodels = "replay"\n', "models must be"),
        ('[[token]]\ntenant = "a"\ntoken = "t"\nscope = "x"\n', "unknown key(s) scope"),
        ('[[token]]\ntenant = "a"\ntoken = "t"\nlength_hints = 1\n', "length_hints must be"),
        ('[[token]]\ntenant = "a"\ntoken = "t"\nlength_hints = "yes"\n', "length_hints must be"),
        (
            f'[[token]]\ntenant = "a"\ntoken = "t1"\n[[token]]\ntenant = "b"\ntoken = "t2"\n'
            f'[[token]]\ntenant = "c"\nsha256 = "{sha("t1")}"\n',
            "entries 1 and 3 hold the same token",
        ),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_the_entry(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = write(tmp_path / "tokens.toml", text)
    with pytest.raises(TokensFileError) as err:
        TokenStore(path)
    assert problem in str(err.value)
    assert str(path) in str(err.value)


def test_a_problem_in_a_later_entry_names_that_entry_and_never_a_token(tmp_path: Path) -> None:
    text = TWO + '\n[[token]]\ntenant = "c"\ntoken = "secret value"\n'
    with pytest.raises(TokensFileError) as err:
        parse_tokens(text, "f.toml")
    assert "entry 3 (tenant 'c')" in str(err.value)
    assert "secret" not in str(err.value) and ALPHA not in str(err.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokensFileError, match=r"cannot read tokens file .*absent\.toml"):
        TokenStore(tmp_path / "absent.toml")


def test_every_entry_is_compared_whichever_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = "".join(f'[[token]]\ntenant = "t{i}"\ntoken = "token-{i}"\n' for i in range(6))
    store = TokenStore(write(tmp_path / "tokens.toml", entries))
    compared: list[bytes] = []
    real = auth.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(auth, "compare_digest", counting)
    for token, tenant in (("token-0", "t0"), ("token-5", "t5"), ("unknown", None)):
        compared.clear()
        found = store.authenticate(token)
        assert (found.name if found else None) == tenant
        # The first entry matching does not stop the loop: all six, in order.
        assert compared == [hashlib.sha256(f"token-{i}".encode()).digest() for i in range(6)]


def test_a_rotated_file_is_used_without_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    path = write(tmp_path / "tokens.toml", TWO)
    store = TokenStore(path, check_interval_s=1.0, clock=clock)
    new = "gamma-token-rotated-in"
    write(path, f'[[token]]\ntenant = "team-a"\ntoken = "{new}"\n')
    # Within the interval the file is not looked at: the old tokens still hold.
    clock.now += 0.5
    assert store.authenticate(new) is None
    assert store.authenticate(ALPHA) is not None
    clock.now += 0.6
    with caplog.at_level(logging.DEBUG, logger="shortline.common.auth"):
        assert store.authenticate(new) == Tenant("team-a", None)
    assert store.authenticate(ALPHA) is None and store.authenticate(BETA) is None
    assert "reloaded: 1 tokens, 1 tenants" in caplog.text
    assert new not in caplog.text and sha(new) not in caplog.text


def test_an_in_place_rewrite_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(TWO)
    store = TokenStore(path, check_interval_s=0.0)
    path.write_text('[[token]]\ntenant = "solo"\ntoken = "in-place-token"\n')
    assert store.authenticate("in-place-token") == Tenant("solo", None)
    assert store.authenticate(ALPHA) is None


def test_a_bad_rewrite_keeps_the_tokens_in_force_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "tokens.toml", TWO)
    store = TokenStore(path, check_interval_s=0.0)
    leaked = "half-written-token"
    with caplog.at_level(logging.DEBUG, logger="shortline.common.auth"):
        write(path, f'[[token]]\ntenant = "team-a"\ntoken = "{leaked}"\nmodels = [\n')
        assert store.authenticate(ALPHA) == Tenant("team-a", None)
        assert store.authenticate(leaked) is None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert str(path) in warnings[0].getMessage()
        assert "not valid TOML" in warnings[0].getMessage()
        assert "keeping the 2 tokens in force" in warnings[0].getMessage()
        # Not reported again until the file changes again.
        assert store.authenticate(BETA) is not None
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        # A deleted file keeps them too.
        path.unlink()
        assert store.authenticate(ALPHA) is not None
        # And the file fixed: the new tokens take over.
        write(path, f'[[token]]\ntenant = "team-a"\ntoken = "{leaked}"\n')
        assert store.authenticate(leaked) == Tenant("team-a", None)
        assert store.authenticate(ALPHA) is None
    for secret in (ALPHA, BETA, leaked, sha(ALPHA), sha(BETA), sha(leaked)):
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER   abc  ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer a b", None),
        ("abc", None),
    ],
)
def test_authorization_values(value: str, token: str | None) -> None:
    assert parse_authorization(value) == token


def test_bearer_token_from_metadata_says_what_is_missing() -> None:
    assert bearer_token([("x-other", "1"), ("authorization", "Bearer tok")]) == ("tok", None)
    assert bearer_token([("authorization", b"Bearer tok")]) == ("tok", None)
    none, problem = bearer_token([("x-other", "1")])
    assert none is None and problem is not None and problem.startswith("missing bearer token")
    none, problem = bearer_token(None)
    assert none is None and problem is not None and problem.startswith("missing bearer token")
    none, problem = bearer_token([("authorization", "Basic dXNlcg==")])
    assert none is None and problem is not None and problem.startswith("invalid bearer token")
    none, problem = bearer_token([("authorization", "Bearer a"), ("authorization", "Bearer b")])
    assert none is None and problem is not None and problem.startswith("invalid bearer token")
