"""The proxy's CPU per routing decision: the request pipeline with its per-poll memo, against rebuilding the
decision from the cluster state on every request (what `choose` did before: correct the state, run `check`),
measured in the same run on a state of 5 GPU nodes, a CPU node and 9 models.

Two cases: the proxy's traffic keeps its busy set (many requests in flight: the memo holds), and the busy set
changes on every request (one request at a time: the memo is rebuilt). Goal: with the memo held, a whole
decision (candidates, four scorers, the picker) costs less than the rebuild alone.
Run: `python bench/route.py [--decisions 2000]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_decide import NOW, build, lm, node  # noqa: E402

from gpurouter.decide import placement  # noqa: E402
from gpurouter.decide.route.ask import ask_of  # noqa: E402
from gpurouter.decide.route.candidates import corrected  # noqa: E402
from gpurouter.decide.route.pipeline import Memo, choose  # noqa: E402
from gpurouter.decide.route.prefix import PromptIndex  # noqa: E402
from gpurouter.decide.route.traffic import Traffic  # noqa: E402

M = "llama3.1:latest"
OTHERS = [f"m{i}:latest" for i in range(8)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--decisions", type=int, default=2000)
    n = parser.parse_args().decisions
    gpus = [
        node(f"n{i}", (24576,), loaded=(lm(M, 5000), lm(OTHERS[i], 1000)), installed=(M, *OTHERS)) for i in range(5)
    ]
    state = build([*gpus, node("cpu", (), installed=(M,))], needs={M: 5000, **dict.fromkeys(OTHERS, 1000)})
    prompt = {"messages": [{"role": "system", "content": "You help. " * 800}, {"role": "user", "content": "hi"}]}
    ask = ask_of("/api/chat", prompt, M)
    index = PromptIndex()
    for i in range(5):
        index.sent(f"n{i}", M, ask.blocks, 4)

    def timed(decide: object) -> float:
        started = time.perf_counter()
        for i in range(n):
            decide(i)  # type: ignore[operator]
        return (time.perf_counter() - started) / n * 1e6

    memo = Memo()
    held = timed(lambda i: choose(state, ask, Traffic(in_flight={("n0", M): 1}, prompts=index), NOW, memo=memo))
    churn = timed(lambda i: choose(state, ask, Traffic(in_flight={(f"n{i % 5}", M): 1}, prompts=index), NOW, memo=memo))
    rebuild = timed(lambda i: placement.check(corrected(state, Traffic(in_flight={("n0", M): 1})), M, NOW))
    print(f"pipeline, busy set held:            {held:7.0f} µs a decision")
    print(f"pipeline, busy set changes each time: {churn:5.0f} µs a decision")
    print(f"rebuild (corrected state + check):  {rebuild:7.0f} µs a decision")
    verdict = "MET" if held < rebuild else "MISSED"
    print(f"goal a held decision costs less than a rebuild: {verdict} ({held / rebuild:.2f} of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
