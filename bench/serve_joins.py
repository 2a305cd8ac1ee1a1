"""What a join costs in the continuous-batching loop: per-step times when requests arrive one at a time.

    python bench/serve_joins.py        # after bench/serve.py --setting library has built its world

In process, on the library setting's engine (mixture, k = 3, batch 32, 32 new tokens, fp32, 2 threads):
40 requests are added one every second step, then the loop drains. Prints each step's seconds and the
rows running after it; a step that admitted a row runs that row's prefill (encoder and first decoder
step) beside the running rows' decoding step.
"""

import json
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import serve  # noqa: E402

from lorahub_cli.registry import Store  # noqa: E402
from lorahub_cli.serve.engine import Engine, Request, Session  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    world = json.loads((serve.CACHE / "library" / "world-256.json").read_text())
    engine = Engine.from_registry(
        Store(Path(world["home"])),
        dtype="float32",
        device="cpu",
        k=serve.K,
        compose="mixture",
        max_new_tokens=32,
        batch_size=serve.BATCH,
        max_input_tokens=serve.MAX_INPUT_TOKENS,
    )
    serve.suppress_special(engine.base.model, engine.base.tokenizer, False)
    texts = [r["input"] for r in world["requests"]]
    engine.run([Request(t, max_new_tokens=2) for t in texts[:2]])  # warm-up
    session, added, steps = Session(engine), 0, []
    while added < 40 or session.busy:
        joined = added < 40 and len(steps) % 2 == 0
        if joined:
            session.add([engine.check(Request(texts[added], max_new_tokens=32))], keys=[added])
            added += 1
        start = time.perf_counter()
        session.step()
        steps.append((time.perf_counter() - start, session.running, joined))
    for label, chosen in (("with a join", True), ("without", False)):
        times = sorted(t for t, rows, j in steps if j == chosen and rows >= 12)
        if times:
            print(
                f"steps {label} (12 or more rows running): {len(times)}, median {times[len(times) // 2]:.3f} s, "
                f"range {times[0]:.3f}-{times[-1]:.3f} s"
            )


if __name__ == "__main__":
    main()
