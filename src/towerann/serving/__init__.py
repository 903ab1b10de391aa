"""The request path: a retrieval bundle (user tower + item index + id map, one version), the holder
that swaps it, the `Retriever` that answers a request in Python, and the online recall monitor.

    retriever = Retriever(BundleHolder(RetrievalBundle.load("indexes/")), open_store("embedded"))
    retriever.candidates("u42", k=100)

The HTTP app around the Retriever is `towerann.serving.app` (FastAPI), never loaded from here: the batch
commands use the bundle without the web stack. Publishing a bundle is a build step:
`towerann.freshness.publish.publish_bundle`.

The names below are loaded from their modules on first use, so importing one module of the package
(`towerann.serving.bundle`) does not import the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from towerann.lazy import lazy_names

if TYPE_CHECKING:
    from towerann.serving.bundle import RetrievalBundle
    from towerann.serving.holder import BundleHolder
    from towerann.serving.monitor import RecallMonitor
    from towerann.serving.query import check_query_vector
    from towerann.serving.retriever import Candidates, Retriever

__all__ = ["BundleHolder", "Candidates", "RecallMonitor", "Retriever", "RetrievalBundle", "check_query_vector"]

_MODULE_OF = {
    "RetrievalBundle": "bundle",
    "BundleHolder": "holder",
    "RecallMonitor": "monitor",
    "check_query_vector": "query",
    "Candidates": "retriever",
    "Retriever": "retriever",
}

if not TYPE_CHECKING:  # the type checker reads the imports above instead
    __getattr__ = lazy_names(__name__, _MODULE_OF)
