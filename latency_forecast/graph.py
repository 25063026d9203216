"""The call graph between services (contract section 1, optional input): validating the JSON
``{"edges": [{"caller": ..., "callee": ...}]}`` that store.py reads, and who calls whom."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from latency_forecast.errors import UserError, warn

CALL_GRAPH_FILE = "call_graph.json"
_SHAPE = '{"edges": [{"caller": ..., "callee": ...}, ...]}'


@dataclass(frozen=True)
class CallGraph:
    """Directed caller → callee edges, each once, in the order first given."""

    edges: tuple[tuple[str, str], ...]

    def callees(self, service: str) -> list[str]:
        """The services ``service`` calls (never itself)."""
        return [callee for caller, callee in self.edges if caller == service and callee != service]

    def as_dict(self) -> dict[str, Any]:
        return {"edges": [{"caller": caller, "callee": callee} for caller, callee in self.edges]}


def parse_call_graph(entries: Any, source: str, services: Sequence[str] | None = None) -> CallGraph:
    """Validate a call graph read from JSON; extra keys are ignored.

    Edges naming a service that is not in ``services`` (the store's; None keeps every edge) are
    dropped, with one warning line.

    Raises
    ------
    UserError : when the JSON is not of the contract's shape.
    """
    if not isinstance(entries, dict) or not isinstance(entries.get("edges"), list):
        raise UserError(f"call graph {source} is not a JSON object {_SHAPE}; fix the file or leave it out")
    edges: dict[tuple[str, str], None] = {}
    for index, edge in enumerate(entries["edges"]):
        if not isinstance(edge, dict) or not all(isinstance(edge.get(key), str) and edge.get(key) for key in ("caller", "callee")):
            raise UserError(f"call graph {source}, edge {index} is not an object with caller and callee service names: {edge!r}")
        edges[(edge["caller"], edge["callee"])] = None
    if services is not None:
        known = set(services)
        unknown = sorted({name for edge in edges for name in edge if name not in known})
        if unknown:
            dropped = [edge for edge in edges if edge[0] not in known or edge[1] not in known]
            warn(
                f"call graph {source}: {len(dropped)} of {len(edges)} edges name services absent from the store "
                f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); they are ignored"
            )
            edges = {edge: None for edge in edges if edge[0] in known and edge[1] in known}
    return CallGraph(tuple(edges))
