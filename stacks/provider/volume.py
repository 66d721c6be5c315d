"""``docker:index/volume:Volume``: name, driver, driverOpts and labels force a replacement."""

from __future__ import annotations

import contextlib
from typing import Any

import docker.errors

from stacks.provider.errors import PropertyError
from stacks.provider.resource import Context, Resource, labels_to_dict, labels_to_wire
from stacks.provider.schema import LABELS, STR, map_of, obj
from stacks.provider.wire import Props


class Volume(Resource):
    token = "docker:index/volume:Volume"
    inputs = obj(name=STR, driver=STR, driverOpts=map_of(STR), labels=LABELS)
    computed = frozenset({"driver"})
    outputs = ("mountpoint",)

    def create(self, ctx: Context, inputs: Props) -> tuple[str, Props]:
        name = inputs["name"]
        try:
            ctx.docker.api.inspect_volume(name)
        except docker.errors.NotFound:
            pass
        else:
            # `docker volume create` of an existing name silently returns it; adopting a volume
            # we did not make would hand a stranger's data to a sandbox.
            raise PropertyError("name", f"a volume named {name!r} already exists")
        try:
            ctx.docker.api.create_volume(
                name,
                driver=inputs.get("driver", "local"),
                driver_opts=inputs.get("driverOpts"),
                labels=labels_to_dict(inputs.get("labels")),
            )
        except docker.errors.APIError as exc:
            prop = "driverOpts" if "opt" in (exc.explanation or "") else "driver"
            raise PropertyError(prop, exc.explanation or str(exc)) from exc
        return name, self.read_back(ctx, name, inputs, after="create")

    def read(
        self, ctx: Context, id_: str, state: Props, inputs: Props
    ) -> tuple[Props, Props] | None:
        try:
            attrs: dict[str, Any] = ctx.docker.api.inspect_volume(id_)
        except docker.errors.NotFound:
            return None
        actual: Props = {"name": attrs["Name"], "driver": attrs.get("Driver", "local")}
        if attrs.get("Labels"):
            actual["labels"] = labels_to_wire(attrs["Labels"])
        if attrs.get("Options"):
            actual["driverOpts"] = attrs["Options"]
        new_inputs = self.declared(actual, inputs)
        return {**actual, "mountpoint": attrs.get("Mountpoint", "")}, new_inputs

    def delete(self, ctx: Context, id_: str, state: Props) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            ctx.docker.api.remove_volume(id_, force=True)
