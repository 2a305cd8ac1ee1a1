"""Who joins when: continuous batching's admission policies side by side, in process, on the library setting.

    python bench/serve_joins.py --requests 128 --in-flight 64 --policies 0:0,0.3:20,0.6:20 --repeats 2
    # builds (or reuses) bench/serve.py's library world of 256 requests

The library setting's engine (mixture, k = 3, batch 32, fp32, 2 threads; `bench/serve.py`), each request with
its own max_new_tokens drawn from --answer-lengths (seeded, as bench/serve.py draws them). Traffic as an HTTP
client with --in-flight connections makes it: that many requests are in the session at the start, and each
answer lets the next request in, at the step that finished it. A policy RATIO:STEPS[:TOKENS] is
decoding.Admission(waiting_served_ratio=RATIO, max_waiting_steps=STEPS, max_prefill_tokens=TOKENS); 0:0 is
the earlier behaviour (every waiting row joins at the next step). Policies run in turn, --repeats times
(the order reversed every other time, so drift in the machine's load falls on all of them alike).

Printed per policy: seconds, requests/s, prefill passes, decoding steps, the median step with and without a
join, and whether every answer equals the same request's answer under the first policy (greedy).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import serve  # noqa: E402

from lorahub_cli.decoding import Admission  # noqa: E402
from lorahub_cli.registry import Store  # noqa: E402
from lorahub_cli.serve.engine import Engine, Request  # noqa: E402


def policy(text: str) -> Admission:
    parts = text.split(":")
    tokens = int(parts[2]) if len(parts) > 2 else Admission().max_prefill_tokens
    return Admission(float(parts[0]), int(parts[1]), tokens)


def closed_loop(engine: Engine, requests: list[Request], in_flight: int) -> dict:
    """The requests through one session, at most `in_flight` in it at once; per-step seconds and joins."""
    session = engine.session()
    nxt, answers, steps = 0, [None] * len(requests), []
    start = time.perf_counter()
    while nxt < len(requests) or session.busy:
        room = in_flight - session.load
        if room > 0 and nxt < len(requests):
            take = list(range(nxt, min(len(requests), nxt + room)))
            session.add([requests[i] for i in take], keys=take)
            nxt += len(take)
        prefills = session.prefills
        began = time.perf_counter()
        for key, answer in session.step():
            answers[key] = answer
        steps.append((time.perf_counter() - began, session.prefills > prefills))
    seconds = time.perf_counter() - start
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
    return {
        "seconds": seconds,
        "prefills": session.prefills,
        "steps": len(steps),
        "step_join": median([t for t, joined in steps if joined]),
        "step_plain": median([t for t, joined in steps if not joined]),
        "outputs": [a.output for a in answers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--answer-lengths", default="4-64")
    parser.add_argument("--policies", default="0:0,0.3:20,0.6:20")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = serve.build_world("library", 256)
    limits = serve.answer_limits(len(world["requests"]), args.answer_lengths, 64)[: args.requests]
    engine = Engine.from_registry(
        Store(Path(world["home"])),
        dtype="float32",
        device="cpu",
        k=serve.K,
        compose="mixture",
        max_new_tokens=max(limits),
        batch_size=serve.BATCH,
        max_input_tokens=serve.MAX_INPUT_TOKENS,
    )
    serve.suppress_special(engine.base.model, engine.base.tokenizer, False)
    texts = [r["input"] for r in world["requests"]][: args.requests]
    engine.run([Request(t, max_new_tokens=2) for t in texts[:2]])  # warm-up
    requests = [engine.check(Request(t, max_new_tokens=m)) for t, m in zip(texts, limits)]
    names = args.policies.split(",")
    runs = {name: [] for name in names}
    load = open("/proc/loadavg").read().split()[:3]
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            engine.admission = policy(name)
            runs[name].append(closed_loop(engine, requests, args.in_flight))
            r = runs[name][-1]
            print(f"  {name}: {r['seconds']:.1f} s, {r['prefills']} prefills", file=sys.stderr, flush=True)
    print(
        f"{args.requests} requests, max_new_tokens from {args.answer_lengths} (seeded), {args.in_flight} in flight, "
        f"batch {serve.BATCH}, {args.threads} threads; /proc/loadavg {' '.join(load)} at the start, "
        f"{' '.join(open('/proc/loadavg').read().split()[:3])} at the end"
    )
    print(
        "| policy (ratio:steps:tokens) | seconds (each run) | requests/s (best) | prefills | steps "
        "| median step with a join / without (s) | outputs equal to the first policy |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    reference = runs[names[0]][0]["outputs"]
    for name in names:
        rs = runs[name]
        best = min(r["seconds"] for r in rs)
        equal = sum(sum(a == b for a, b in zip(r["outputs"], reference)) for r in rs)
        a = policy(name)
        each = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        print(
            f"| {a.waiting_served_ratio}:{a.max_waiting_steps}:{a.max_prefill_tokens} "
            f"| {each} | {args.requests / best:.2f} "
            f"| {rs[0]['prefills']} | {rs[0]['steps']} | {rs[0]['step_join']:.3f} / {rs[0]['step_plain']:.3f} "
            f"| {equal}/{len(rs) * len(reference)} |"
        )


if __name__ == "__main__":
    main()
