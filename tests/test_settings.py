"""Settings and the backend URL derivation (pure)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.settings import Settings, postgres_backend_url


@pytest.mark.parametrize(
    ("database_url", "table", "expected"),
    [
        (
            "postgresql://u:p@h:5432/db",
            "pulumi_state",
            "postgres://u:p@h:5432/db?sslmode=disable&table=pulumi_state",
        ),
        ("postgres://u@h/db?sslmode=require", "t", "postgres://u@h/db?sslmode=require&table=t"),
        (
            "postgresql://u@h/db?table=old&connect_timeout=5",
            "new",
            "postgres://u@h/db?connect_timeout=5&sslmode=disable&table=new",
        ),
    ],
)
def test_postgres_backend_url(database_url: str, table: str, expected: str) -> None:
    assert postgres_backend_url(database_url, table) == expected


def test_backend_defaults_to_the_engine_database() -> None:
    s = Settings(database_url="postgresql://a:b@db:5/x")
    assert s.backend_url() == "postgres://a:b@db:5/x?sslmode=disable&table=pulumi_state"
    s = Settings(database_url="postgresql://a:b@db:5/x", pulumi_backend_url="file:///tmp/s")
    assert s.backend_url() == "file:///tmp/s"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("database_url", "mysql://u@h/db"),
        ("pulumi_state_table", "x; drop table y"),
        ("listen_port", 0),
        ("domain", "Evil.com`)"),
        ("edge_subnet", "10.212.0.5/20"),  # host bits set
        ("edge_subnet", "8.8.8.0/24"),  # not a private range
        ("edge_subnet", "10.212.0.0/30"),  # two addresses
        ("edge_subnet", "10.212.0.0/20,10.1.0.0/16"),
    ],
)
def test_unsafe_settings_fail_fast_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**{field: value})
    assert field in str(info.value)


def test_database_password_is_not_in_repr() -> None:
    s = Settings(database_url="postgresql://u:hunter2@h/db")
    assert "hunter2" not in repr(s)


def test_the_edge_subnet_may_be_left_to_docker() -> None:
    assert Settings(edge_subnet="").edge_subnet == ""
    assert Settings().edge_subnet == "10.212.0.0/20"
