"""What every resource of the provider implements. Values are plain dicts of wire names."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import docker

from stacks.provider.diffing import Diff, diff_inputs
from stacks.provider.errors import CheckFailures, ProviderError
from stacks.provider.schema import T, validate_object
from stacks.provider.wire import UNKNOWN, Props


@dataclass(frozen=True)
class Context:
    """What an operation knows besides the properties."""

    docker: docker.DockerClient
    urn_name: str  # the resource's name in the program
    preview: bool = False


class Resource(ABC):
    token: ClassVar[str]
    inputs: ClassVar[T]  # an object type: the resource's input properties
    in_place: ClassVar[frozenset[str]] = frozenset()  # properties that change without a replace
    computed: ClassVar[frozenset[str]] = frozenset()  # optional inputs Docker fills in when unset
    outputs: ClassVar[tuple[str, ...]] = ()  # computed outputs, unknown during preview
    delete_before_replace: ClassVar[bool] = False

    def check(self, news: Props, olds: Props, *, autoname: str | None) -> Props:
        """Validate and fill defaults; raise CheckFailures naming each bad property."""
        failures = validate_object(news, self.inputs)
        failures.extend(self.check_values(news))
        if failures:
            raise CheckFailures(failures)
        return self.defaults(news, olds, autoname=autoname)

    def check_values(self, news: Props) -> list[tuple[str, str]]:
        """Checks beyond types (ranges, enums). Default: none."""
        return []

    def defaults(self, news: Props, olds: Props, *, autoname: str | None) -> Props:
        """Inputs with defaults filled in. Default: a stable autoname for an unset ``name``."""
        if "name" in self.inputs.fields and not news.get("name"):
            news = {**news, "name": olds.get("name") or autoname}
        return news

    def diff(self, old_inputs: Props, news: Props, state: Props) -> Diff:
        return diff_inputs(
            self._with_filled_in(old_inputs, state),
            news,
            in_place=self.in_place,
            computed=self.computed,
        )

    def _with_filled_in(self, old_inputs: Props, state: Props) -> Props:
        """Old inputs plus the values Docker filled in for computed properties left unset, so
        that declaring a property with the value it already has is no change."""
        filled = {k: state[k] for k in self.computed if k in state and k not in old_inputs}
        return {**filled, **old_inputs}

    def preview_outputs(self, inputs: Props) -> Props:
        return {**inputs, **{k: UNKNOWN for k in self.outputs}}

    @abstractmethod
    def create(self, ctx: Context, inputs: Props) -> tuple[str, Props]:
        """Create the object; on failure leave nothing behind."""

    @abstractmethod
    def read(
        self, ctx: Context, id_: str, state: Props, inputs: Props
    ) -> tuple[Props, Props] | None:
        """Current (outputs, inputs) of the object, or None when it no longer exists."""

    def read_back(self, ctx: Context, id_: str, inputs: Props, *, after: str) -> Props:
        """Outputs of an object just created or updated; an error if it is already gone."""
        found = self.read(ctx, id_, {}, inputs)
        if found is None:
            raise ProviderError(f"{inputs.get('name')!r} disappeared right after the {after}")
        return found[0]

    def declared(self, actual: Props, inputs: Props) -> Props:
        """Inputs as they are now: what was declared, plus what Docker does not fill in."""
        return {k: v for k, v in actual.items() if k in inputs or k not in self.computed}

    def update(self, ctx: Context, id_: str, olds: Props, news: Props) -> Props:
        raise NotImplementedError(f"{self.token} has no in-place updates")

    @abstractmethod
    def delete(self, ctx: Context, id_: str, state: Props) -> None:
        """Remove the object; one already gone is success."""


def labels_to_dict(labels: list[dict[str, Any]] | None) -> dict[str, str]:
    return {item["label"]: item["value"] for item in labels or []}


def labels_to_wire(labels: dict[str, str]) -> list[dict[str, str]]:
    return [{"label": k, "value": v} for k, v in sorted(labels.items())]
