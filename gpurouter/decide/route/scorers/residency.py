"""Residency: where the model runs if the request goes there. Fully on GPU 1; a load to GPU the proxy already
sent, under way 0.85 (joining it costs no more time than starting another load, and no more memory); loads
fully on GPU in free VRAM 0.8; loads fully on GPU after evicting idle models 0.65; reloads its idle runner with
the request's options, fully on GPU 0.6 (a load, and requests with the old options would reload it back); a
partial copy 0.1 + 0.4 × its GPU share (a load that would land partial: 0.2); a CPU copy 0.05; a load on CPU
0."""

from __future__ import annotations

from gpurouter.decide.route.candidates import Candidate


def score(c: Candidate) -> float:
    return c.tier
