"""Freshness: what changes the served catalog without a restart.

- the delta log (deltalog.py): every item write, durable before it is acknowledged;
- live item writes onto the served bundle, and their replay after a restart or a swap (live.py);
- the binding of a delta log to the index root it is served with (log_binding.py);
- building and publishing a bundle (publish.py) and the batch rebuild from the catalog and the delta
  log (refresh.py: `refresh.refresh`, the `towerann refresh` command);
- the validated hot swap of a new bundle (reload.py).

It implements the protocols of the HTTP app's write routes (`serving.app.ItemWrites`, `BundleReloads`);
`serving` never imports it. Nothing here imports a web framework.

The names below are loaded from their modules on first use, so importing one module of the package
(`towerann.freshness.deltalog`) does not import the others. The rebuild, `refresh.refresh`, is not
among them: the package's name `refresh` is its module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from towerann.lazy import lazy_names

if TYPE_CHECKING:
    from towerann.freshness.deltalog import (
        DeltaEntry,
        DeltaLog,
        DurabilityWatch,
        check_durable,
        open_configured_delta_log,
        open_delta_log,
    )
    from towerann.freshness.live import ItemWriter, fold_catalog, replay
    from towerann.freshness.log_binding import bind_delta_log
    from towerann.freshness.publish import publish_bundle
    from towerann.freshness.reload import Reloader

__all__ = [
    "DeltaEntry",
    "DeltaLog",
    "DurabilityWatch",
    "ItemWriter",
    "Reloader",
    "bind_delta_log",
    "check_durable",
    "fold_catalog",
    "open_configured_delta_log",
    "open_delta_log",
    "publish_bundle",
    "replay",
]

_MODULE_OF = {
    "DeltaEntry": "deltalog",
    "DeltaLog": "deltalog",
    "DurabilityWatch": "deltalog",
    "check_durable": "deltalog",
    "open_configured_delta_log": "deltalog",
    "open_delta_log": "deltalog",
    "ItemWriter": "live",
    "fold_catalog": "live",
    "replay": "live",
    "bind_delta_log": "log_binding",
    "publish_bundle": "publish",
    "Reloader": "reload",
}

if not TYPE_CHECKING:  # the type checker reads the imports above instead
    __getattr__ = lazy_names(__name__, _MODULE_OF)
