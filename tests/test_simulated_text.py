"""The simulated node's text reads as sentences: a word never runs into the next sentence's first word."""

from __future__ import annotations

import re

import requests

from simulator.run import Fleet, fleet_from_dict


def test_sentences_are_separated_by_a_space():
    fleet_spec = fleet_from_dict({"nodes": [{"name": "a", "models": ["llama3.2:1b"], "token_rate": 0}]})
    with Fleet(fleet_spec) as fleet:
        body = {"model": "llama3.2:1b", "prompt": "x", "stream": False, "options": {"num_predict": 60}}
        text = requests.post(f"{fleet.urls['a']}/api/generate", json=body, timeout=30).json()["response"]
    assert "The" in text and re.search(r"\S(The|It) ", text) is None, text
