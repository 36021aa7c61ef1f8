"""Where knowledge lives: causal tracing and FFN value vectors projected into vocabulary space."""

from lmedit.locate.causal_trace import (
    AggregateResult,
    TraceResult,
    aggregate,
    causal_trace,
    plot_aggregate,
    plot_trace,
    suggest_layers,
)

__all__ = [
    "AggregateResult",
    "TraceResult",
    "aggregate",
    "causal_trace",
    "plot_aggregate",
    "plot_trace",
    "suggest_layers",
]
