"""Where releases run. `canary --target T` resolves one `ReleaseTarget` (base.py) and every
command calls one method of it: `local.py` (the local stack and the compose stack) and
`k8s.py` (Gateway API routes on a cluster). A command a target cannot do is refused by that
target in one line, never silently done somewhere else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _local(home: Any) -> Any:
    from deploy.targets.local import local_target

    return local_target(home)


def _compose(home: Any) -> Any:
    from deploy.targets.local import compose_target

    return compose_target(home)


def _k8s(home: Any) -> Any:
    from deploy.targets.k8s import KubernetesTarget

    return KubernetesTarget(home)


# --target name -> the factory of its ReleaseTarget (imports stay lazy: the CLI starts fast)
TARGETS: dict[str, Callable[[Any], Any]] = {"local": _local, "compose": _compose, "k8s": _k8s}
