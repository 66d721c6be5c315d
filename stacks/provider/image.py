"""``docker:index/remoteImage:RemoteImage``: an image already present on the Docker host.

No registry is reachable from these hosts, so nothing is pulled: a missing image is an error
naming it. On destroy the image is kept when ``keepLocally`` is true, else removed (as upstream).
"""

from __future__ import annotations

import docker.errors

from stacks.provider.errors import PropertyError
from stacks.provider.resource import Context, Resource
from stacks.provider.schema import BOOL, STR, list_of, map_of, obj
from stacks.provider.wire import Props


class RemoteImage(Resource):
    token = "docker:index/remoteImage:RemoteImage"
    inputs = obj(
        ("name",),
        name=STR,
        keepLocally=BOOL,
        forceRemove=BOOL,
        platform=STR,
        pullTriggers=list_of(STR),
        triggers=map_of(STR),
    )
    in_place = frozenset({"keepLocally", "forceRemove"})
    outputs = ("imageId", "repoDigest")

    def defaults(self, news: Props, olds: Props, *, autoname: str | None) -> Props:
        return news  # the image name is required; there is nothing to autoname

    def create(self, ctx: Context, inputs: Props) -> tuple[str, Props]:
        outputs = self._resolve(ctx, inputs)
        return f"{outputs['imageId']}{inputs['name']}", outputs

    def _resolve(self, ctx: Context, inputs: Props) -> Props:
        name = inputs["name"]
        try:
            image = ctx.docker.images.get(name)
        except docker.errors.ImageNotFound as exc:
            raise PropertyError(
                "name",
                f"image {name!r} is not present on the Docker host, and images are not pulled "
                "here: build or load it first",
            ) from exc
        digests = image.attrs.get("RepoDigests") or []
        # A registry gives an image a repo digest; one built or loaded on this host has none, and
        # its id is then the reference that pins it just as well (so `image=x.repo_digest` works).
        return {**inputs, "imageId": image.id, "repoDigest": digests[0] if digests else image.id}

    def read(
        self, ctx: Context, id_: str, state: Props, inputs: Props
    ) -> tuple[Props, Props] | None:
        # The id is the image id followed by the name, as upstream: "sha256:<64 hex><name>".
        name = id_[len("sha256:") + 64 :] if id_.startswith("sha256:") else id_
        props = inputs or {"name": state.get("name") or name}
        try:
            outputs = self._resolve(ctx, props)
        except PropertyError:
            return None
        return outputs, props

    def update(self, ctx: Context, id_: str, olds: Props, news: Props) -> Props:
        return {**olds, **news}

    def delete(self, ctx: Context, id_: str, state: Props) -> None:
        if state.get("keepLocally"):
            return
        try:
            ctx.docker.images.remove(state["imageId"], force=bool(state.get("forceRemove")))
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # still used by a container: upstream also leaves it
                raise
