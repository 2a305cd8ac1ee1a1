"""The serving engine: a base model, one LoRA bank loaded once, a router; requests in, answers out.

    engine = Engine.from_registry(store, k=3, compose="mixture")
    engine = Engine.from_adapter("my-lora")    # one adapter for every request: a composition or any PEFT folder
    answers = engine.run([Request("What is 2 plus 2?"), Request("Translate ...", k=1)])
    session = engine.session()       # continuous batching, step by step (what the server's batcher drives)

The bank holds every adapter a router can choose (every carded adapter of the base
model, every shot's composition, or the one adapter), injected once: no adapter is loaded per batch.
Requests that use different adapters share forward passes; only the bank mode
splits a call (mixture rows run in the linear mode, fusion and single rows in the
elementwise one), because a forward pass evaluates one mode.

`ServingEngine` writes down what the HTTP server needs of an engine (`Engine` is the real one).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..decoding import GREEDY, Admission, Sampling
from ..errors import InputError
from ..routing import COMPOSE_MODES, AdapterRouter, RetrievalRouter, Route, ShotRouter, check_compose
from ..settings import SERVE as DEFAULTS
from .batcher import Stepper

if TYPE_CHECKING:
    from ..decoding import Decoder


class InputTooLong(InputError):
    """An input over the engine's token limit (HTTP 413)."""


class FieldError(InputError):
    """A request field whose value breaks a rule. `field` is the Request's name for it; `named(name)` is the
    message under the name a client sent (OpenAI's `max_tokens` for `max_new_tokens`)."""

    def __init__(self, field: str, value, rule: str, hint: str):
        self.field, self.value, self.rule = field, value, rule
        super().__init__(self.named(field), hint)

    def named(self, name: str) -> str:
        shown = str(self.value)
        return f"{name} = {shown if len(shown) <= 40 else shown[:37] + '...'} {self.rule}"


@dataclass
class Request:
    input: str
    k: int | None = None  # None: the engine's default
    compose: str | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    # Named adapters and weights instead of retrieval: (("id", 1.0),) is one adapter (LoRAX's adapter_id);
    # several are merged as LoRAX's linear merge does, A = sum w_i A_i and B = sum w_i B_i (the elementwise formula).
    adapters: tuple[tuple[str, float], ...] | None = None
    sampling: Sampling = GREEDY  # how its tokens are chosen; Engine.check gives a sampled request a seed
    ids: list[int] | None = field(default=None, repr=False)  # the input's token ids, set by Engine.check


@dataclass
class Answer:
    input: str
    output: str
    route: dict  # compose mode, adapters with weights (and shot for an instance composition)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # eos_token | stop_sequence | length
    prompt_tokens: int = 0
    seed: int | None = None  # the seed it was sampled with (None: greedy)

    def to_json(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            **self.route,
            **({"seed": self.seed} if self.seed is not None else {}),
        }


@runtime_checkable
class ServingEngine(Protocol):
    """What the HTTP server (serve/server.py) needs of an engine; `Engine` is the real one, the tests' doubles
    declare it too. One thread runs it (the batcher's worker), except `check`, called as requests arrive."""

    batching: str  # "continuous": the batcher steps `session()`; "static": it gives `run` whole batches
    max_new_tokens: int  # the most a request may ask for (OpenAI's default: the lower of 16 and this)

    @property
    def base_model(self) -> str:
        """What /v1/models calls the retrieving default (a `model` that names no adapter)."""
        raise NotImplementedError

    @property
    def names(self) -> list[str]:
        """The adapter ids a request may name: OpenAI's `model`, LoRAX's `adapter_id` and `merged_adapters`."""
        raise NotImplementedError

    @property
    def tokenizer(self):
        """`decode([id])` and `all_special_ids`: TGI's token details."""
        raise NotImplementedError

    def check(self, request: Request) -> Request:
        """The request with its defaults, or an InputError (FieldError: naming the field; InputTooLong: 413)."""
        raise NotImplementedError

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """A conversation ([{"role", "content"}], a user message last) rendered by the base model's chat template
        with the assistant's turn begun, as token ids; an InputError when the model has no chat."""
        raise InputError("this server does not serve chat.", "Use /v1/completions.")

    def run(self, requests: list[Request]) -> list[Answer]:
        """Answers in request order (static batching)."""
        raise NotImplementedError

    def session(self) -> Stepper:
        """A new continuous-batching session (continuous batching)."""
        raise NotImplementedError

    def info(self) -> dict:
        """The engine's settings, as /health reports them."""
        raise NotImplementedError


class Engine(ServingEngine):
    """A base model, its bank and a router. One thread at a time: the bank's weights are one shared state
    for the whole model (the server gives the engine to its batcher's worker thread alone)."""

    def __init__(
        self,
        base,
        bank,
        router,
        *,
        k: int = DEFAULTS["k"],
        compose: str = DEFAULTS["compose"],
        max_new_tokens: int = DEFAULTS["max_new_tokens"],
        batch_size: int = DEFAULTS["batch_size"],
        max_input_tokens: int = DEFAULTS["max_input_tokens"],
        batching: str = DEFAULTS["batching"],
        admission: Admission | None = None,
        description: dict | None = None,
    ):
        from ..decoding import steppable
        from ..generation import check_batching

        if k < 1 or max_new_tokens < 1 or batch_size < 1 or max_input_tokens < 1:
            raise InputError(
                f"k ({k}), max new tokens ({max_new_tokens}), batch size ({batch_size}) and max input "
                f"tokens ({max_input_tokens}) must be 1 or more.",
                "Give positive values.",
            )
        self.base, self.bank, self.router = base, bank, router
        self.k, self.compose, self.max_new_tokens = k, check_compose(compose), max_new_tokens
        self.batch_size, self.max_input_tokens = batch_size, max_input_tokens
        self.admission = admission or Admission()
        # A model the step loop cannot run exactly (decoding.steppable) is served in static batches.
        self.batching = check_batching(batching) if steppable(base) else "static"
        self.description = description or {}

    # --- building ---------------------------------------------------------------------------

    @classmethod
    def from_registry(
        cls,
        store,
        *,
        base_model: str | None = None,
        model_path: str | None = None,
        embedder: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        by: str = "auto",
        **options,
    ) -> Engine:
        """Every adapter of the base model goes into the bank, so any top-k is served without loading; memory
        grows with the library (r x (d_in + d_out) per targeted layer and adapter). Requests rank them by data
        cards, weight cards or both (`by`: retrieval.Retriever; weight cards are scored on the served model, in
        its dtype); with compose arrow, every token is routed among all of them (`arrow_prototypes`)."""
        from ..compose.bank import LoraBank
        from ..compose.pipeline import load_modules
        from ..models import load_base_model
        from ..retrieval import Retriever

        loaded = []

        def load(name: str):
            loaded.append(load_base_model(model_path or name, dtype=dtype, device=device))
            return loaded[0]

        retriever = Retriever.from_store(store, by, base_model, embedder, load)
        records = [store.get(i) for i in retriever.ids]
        adapters = load_modules(store, records)
        base = loaded[0] if loaded else load(records[0].base_model)
        arrow = None
        if options.get("compose") == "arrow":
            arrow = arrow_prototypes(store, records, adapters, options.get("k", DEFAULTS["k"]))
        bank = LoraBank(base.model, adapters, mode="linear")
        if arrow is not None:
            bank.arrow(*arrow)
        router = RetrievalRouter(retriever, elementwise_ok=bank.elementwise_ok, arrow=arrow and arrow[1:])
        description = {"source": "registry", "base_model": records[0].base_model, "adapters": len(adapters)}
        description["by"] = retriever.kind
        if retriever.kind != "weights":
            description["embedder"] = retriever.embedder_key
        if retriever.kind != "data":
            description["weights"] = retriever.about()
        if arrow is not None:
            description["arrow"] = {"top_k": arrow[1], "temperature": arrow[2]}
        return cls(base, bank, router, description=description, **options)

    @classmethod
    def from_composition(
        cls,
        folder: str | Path,
        *,
        model_path: str | None = None,
        embedder: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        **options,
    ) -> Engine:
        """An instance-level composition folder (`compose --level instance`): its shots' compositions and router."""
        from ..cards.embedder import load_embedder
        from ..compose.bank import LoraBank
        from ..compose.folder import read_instance_composition
        from ..models import load_base_model

        folder = Path(folder)
        hint = (
            f"--composition takes a `lorahub compose --level instance` folder; to answer with one adapter "
            f"(a task-level composition or a PEFT folder): --adapter {folder}"
        )
        recipe, adapters, shots = read_instance_composition(folder, hint)
        key = recipe.router["embedder"]
        query_embedder = load_embedder(embedder or key.rpartition("@")[0])
        if query_embedder.key != key:
            raise InputError(f"the router was made with {key}, not {query_embedder.key}.", "Drop --embedder.")
        base = load_base_model(model_path or recipe.base_model, dtype=dtype, device=device)
        bank = LoraBank(base.model, adapters, mode="linear")
        router = ShotRouter(recipe, shots, query_embedder, elementwise_ok=bank.elementwise_ok)
        description = {
            "source": "composition",
            "folder": str(folder),
            "base_model": recipe.base_model,
            "compositions": len(adapters),
            "embedder": key,
        }
        return cls(base, bank, router, description=description, **options)

    @classmethod
    def from_adapter(
        cls,
        folder: str | Path,
        *,
        name: str | None = None,
        model_path: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        **options,
    ) -> Engine:
        """One LoRA adapter answers every request: a task-level composition (`compose --out DIR`) or any PEFT
        LoRA folder, on the base model its adapter_config.json names (or `model_path`). `name`: what answers
        and /v1/models call it (default: the folder's name)."""
        from ..compose.adapters import load_adapter
        from ..compose.bank import LoraBank
        from ..compose.folder import holds_composition, read_composition
        from ..models import load_base_model

        folder = Path(folder)
        if holds_composition(folder) and read_composition(folder).level == "instance":
            raise InputError(
                f"'{folder}' is an instance-level composition: one adapter per shot and a router.",
                f"Answer with it through its router: --composition {folder}",
            )
        adapter = load_adapter(folder, name=name or folder.resolve().name)
        base_model = model_path or adapter.base_model_name_or_path
        if not base_model:
            raise InputError(
                f"{folder / 'adapter_config.json'} names no base model (base_model_name_or_path).",
                "Give the base model with --model-path.",
            )
        base = load_base_model(base_model, dtype=dtype, device=device)
        bank = LoraBank(base.model, [adapter], mode="linear")
        router = AdapterRouter(adapter.name, elementwise_ok=bank.elementwise_ok)
        description = {
            "source": "adapter",
            "folder": str(folder),
            "base_model": adapter.base_model_name_or_path or base_model,
            "adapters": 1,
        }
        return cls(base, bank, router, description=description, **options)

    # --- serving ------------------------------------------------------------------------------

    def check(self, request: Request) -> Request:
        """The request with defaults filled in, or an InputError saying what is wrong with it."""
        if not isinstance(request.input, str) or not request.input.strip():
            raise InputError("the input is empty.", "Give some input text.")
        if request.adapters is not None:
            self.named_route(request.adapters)
        k = self.k if request.k is None else request.k
        compose = check_compose(self.compose if request.compose is None else request.compose)
        limit = self.max_new_tokens if request.max_new_tokens is None else request.max_new_tokens
        if self.router.retrieves and not 1 <= k <= self.bank.n:
            raise FieldError("k", k, f"is outside 1..{self.bank.n} (the adapters this server holds).", "Lower k.")
        if not 1 <= limit <= self.max_new_tokens:
            raise FieldError(
                "max_new_tokens",
                limit,
                f"is outside 1..{self.max_new_tokens}.",
                f"Ask for at most {self.max_new_tokens} new tokens.",
            )
        sampling = request.sampling
        problem = sampling.problem()
        if problem is not None:
            name, value, rule = problem
            raise FieldError(name, value, rule + ".", "Leave it out for the default.")
        if not sampling.greedy and sampling.seed is None:  # a seed to report, so the answer can be drawn again
            sampling = replace(sampling, seed=secrets.randbits(63))
        # Tokenised once, here: the ids travel with the checked request to the decoder.
        ids = (
            request.ids
            if request.ids is not None
            else self.base.tokenizer(request.input, truncation=False)["input_ids"]
        )
        if len(ids) > self.max_input_tokens:
            raise InputTooLong(
                f"the input is {len(ids)} tokens, more than the limit of {self.max_input_tokens}.", "Shorten the input."
            )
        return replace(request, k=k, compose=compose, max_new_tokens=limit, sampling=sampling, ids=ids)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        tokenizer, name = self.base.tokenizer, self.base_model
        if self.base.is_seq2seq:
            raise InputError(
                f"chat needs a decoder-only base model; {name} is an encoder-decoder.",
                "Use /v1/completions with the prompt written out.",
            )
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                f"the tokenizer of {name} has no chat template.",
                "Use /v1/completions, or serve a model whose tokenizer_config.json has a chat_template.",
            )
        try:
            rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as error:  # noqa: BLE001 - a template may refuse a conversation (roles out of order ...)
            raise InputError(f"the chat template refused the messages ({error}).", "Fix the messages.") from None
        return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)

    def named_route(self, adapters: tuple[tuple[str, float], ...]) -> Route:
        """The route of named adapters and weights, or an InputError naming the unknown id or bad weight."""
        column = {name: i for i, name in enumerate(self.bank.names)}
        if not adapters:
            raise InputError("no adapter was named.", "Name at least one adapter id.")
        if len(adapters) > self.bank.n:
            raise InputError(
                f"{len(adapters)} adapters are named; this server holds {self.bank.n}.", "Name each adapter once."
            )
        for name, weight in adapters:
            if name not in column:
                known = ", ".join(self.bank.names[:5]) + (", ..." if self.bank.n > 5 else "")
                raise InputError(
                    f"adapter '{name}' is not served here.", f"Use one of the served ids ({known}; GET /v1/models)."
                )
            if not math.isfinite(weight):
                raise InputError(f"the weight of '{name}' is {weight}.", "Give finite weights.")
        if len({name for name, _ in adapters}) < len(adapters):
            raise InputError("an adapter is named twice.", "Name each adapter once.")
        if len(adapters) > 1 and not self.bank.elementwise_ok:
            raise InputError(
                "merging A and B separately (LoRAX's linear merge) needs adapters of one rank and one "
                "scaling, and these differ.",
                "Name one adapter, or let the server retrieve (mixture).",
            )
        mode = "elementwise" if self.bank.elementwise_ok else "linear"
        info = {
            "compose": "adapter" if len(adapters) == 1 else "merged-linear",
            "adapters": [{"id": name, "weight": weight} for name, weight in adapters],
        }
        return Route(tuple(column[name] for name, _ in adapters), tuple(w for _, w in adapters), mode, info)

    def routes(self, requests: list[Request]) -> list[Route]:
        """Each checked request's route: retrieval (in one call for all) or its named adapters."""
        routes: list[Route] = [None] * len(requests)  # type: ignore[list-item]
        routed = [i for i, r in enumerate(requests) if r.adapters is None]  # named adapters skip the router
        if routed:
            chosen = [requests[i] for i in routed]
            texts = [r.input for r in chosen]
            found = (
                self.router.route(texts, [r.k for r in chosen], [r.compose for r in chosen])
                if self.router.retrieves
                else self.router.route(texts)
            )
            for i, route in zip(routed, found):
                routes[i] = route
        for i, r in enumerate(requests):
            if r.adapters is not None:
                routes[i] = self.named_route(r.adapters)
        return routes

    def session(self) -> Session:
        """A continuous-batching session over this engine (see `Session`)."""
        return Session(self)

    @property
    def base_model(self) -> str:
        return self.description.get("base_model", "lorahub")

    @property
    def names(self) -> list[str]:
        return list(self.bank.names)

    @property
    def tokenizer(self):
        return self.base.tokenizer

    def run(self, requests: list[Request], progress=None) -> list[Answer]:
        """Answers in request order. Every request is checked before any is generated. Continuous batching:
        the requests are a `Session`'s queue at its first step; static: batches of `batch_size`."""
        requests = [self.check(r) for r in requests]
        if not requests:
            return []
        if self.batching == "continuous":
            from ..decoding import drain

            session = self.session()
            session.add(requests, keys=list(range(len(requests))))
            return drain(session, len(requests), progress)
        from ..generation import generate_tokens

        routes = self.routes(requests)
        outputs = [None] * len(requests)
        for mode in sorted({route.mode for route in routes}):
            rows = [i for i, route in enumerate(routes) if route.mode == mode]
            generated = generate_tokens(
                self.base,
                [requests[i].ids for i in rows],
                bank=self.bank,
                weights=[routes[i].row for i in rows],
                mode=mode,
                max_new_tokens=[requests[i].max_new_tokens for i in rows],
                stop=[list(requests[i].stop) for i in rows],
                batch_size=self.batch_size,
                progress=progress,
                batching="static",
                sampling=[requests[i].sampling for i in rows],
            )
            for i, g in zip(rows, generated):
                outputs[i] = g
        return [_answer(r, route, g) for r, g, route in zip(requests, outputs, routes)]

    def info(self) -> dict:
        return {
            **self.description,
            "k": self.k,
            "compose": self.compose,
            "compose_modes": list(COMPOSE_MODES),
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "max_input_tokens": self.max_input_tokens,
            "batching": self.batching,
            "admission": asdict(self.admission),
        }


def arrow_prototypes(store, records, adapters, top_k: int) -> tuple[dict, int, float]:
    """(prototypes per module (N, d_in) in bank order, top_k, temperature) for the bank's Arrow mode, from the
    adapters' weight cards; PEFT's constraints as one-line errors (spectral.arrow.check_arrow)."""
    import torch

    from ..settings import WEIGHTS
    from ..spectral.arrow import check_arrow
    from ..spectral.library import registry_index

    temperature = WEIGHTS["arrow_temperature"]
    check_arrow(adapters, top_k, temperature)
    library = registry_index(store, records)
    if library.left_out:
        first = library.left_out[0]
        raise InputError(
            f"Arrow routing needs every adapter's weight card; '{first['id']}' has none: {first['problem']}",
            "Serve only LoRA adapters lorahub can read, or use --compose mixture.",
        )
    index, order = library.index, [r.id for r in records]
    rows = torch.tensor([index.ids.index(i) for i in order])
    return {m: index.prototypes[m][rows] for m in index.modules}, top_k, temperature


def _answer(request: Request, route: Route, g) -> Answer:
    seed = None if request.sampling.greedy else request.sampling.seed
    return Answer(request.input, g.text, route.info, g.tokens, g.logprobs, g.finish_reason, g.prompt_tokens, seed)


class Session(Stepper):
    """Continuous batching over an engine (the batcher's `Stepper`): checked requests are added (routed, then
    queued) at any time, and each `step()` advances every row by one token and returns the answers that
    finished. One `decoding.Decoder` per bank mode (a forward pass evaluates one), each running up to the
    engine's batch size.

        session = engine.session()
        session.add(requests, keys)              # on_token: per request, called as each token is decoded
        while session.busy:
            for key, answer in session.step(): ...
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.decoders: dict[str, Decoder] = {}  # bank mode -> its decoder

    @property
    def running(self) -> int:
        return sum(d.running for d in self.decoders.values())

    @property
    def load(self) -> int:
        """Rows running or queued in the decoders."""
        return sum(d.running + len(d.waiting) for d in self.decoders.values())

    @property
    def busy(self) -> bool:
        return any(d.busy for d in self.decoders.values())

    @property
    def prefills(self) -> int:
        return sum(d.prefills for d in self.decoders.values())

    def add(
        self, requests: list[Request], keys: list, on_token: list | None = None, cancelled: list | None = None
    ) -> None:
        """Queue checked requests, longest input first (a step admits them in that order, so the rows
        prefilled together are of similar length). `on_token[i]`: called with (token id, log-probability,
        the Answer when this token ended the request, else None); `cancelled[i]()` true: the request
        leaves at the next step, answered None."""
        from ..decoding import Decoder

        engine = self.engine
        routes = engine.routes(requests)
        for i in sorted(range(len(requests)), key=lambda i: -len(requests[i].ids)):
            request, route = requests[i], routes[i]
            decoder = self.decoders.get(route.mode)
            if decoder is None:
                decoder = self.decoders[route.mode] = Decoder(
                    engine.base,
                    bank=engine.bank,
                    mode=route.mode,
                    max_batch=engine.batch_size,
                    admission=engine.admission,
                )
            callback = on_token[i] if on_token else None
            if callback is not None:
                callback = _answering(callback, request, route)
            decoder.add(
                (keys[i], request, route),
                request.ids,
                max_new_tokens=request.max_new_tokens,
                stop=list(request.stop),
                weights=route.row,
                on_token=callback,
                cancelled=cancelled[i] if cancelled else None,
                sampling=request.sampling,
            )

    def step(self) -> list[tuple[object, Answer]]:
        finished = []
        for decoder in self.decoders.values():
            if decoder.busy:
                finished += [
                    (key, None if g is None else _answer(request, route, g))
                    for (key, request, route), g in decoder.step()
                ]
        return finished

    def abandon(self) -> list:
        """Drop every request; their keys."""
        return [key for d in self.decoders.values() for key, _, _ in d.abandon()]


def _answering(callback, request: Request, route: Route):
    return lambda token, logprob, g: callback(token, logprob, None if g is None else _answer(request, route, g))


def read_requests(path: str | Path, sampling: Sampling = GREEDY) -> list[Request]:
    """A requests file: JSONL with `input` and optionally `k`, `compose`, `max_new_tokens` and the sampling fields
    (`temperature`, `top_p`, `top_k`, `repetition_penalty`, `seed`) per line; `sampling`: the fields a line leaves
    out, where line i (from 0) gets sampling.seed + i, so the file is drawn again as a whole and line by line."""
    from ..io import read_examples, read_jsonl

    inputs = read_examples(path, require_target=False)  # checks every input
    requests = []
    for i, ((number, obj), example) in enumerate(zip(read_jsonl(path), inputs)):
        for name in ("k", "max_new_tokens", "top_k", "seed"):
            if name in obj and (not isinstance(obj[name], int) or isinstance(obj[name], bool)):
                raise InputError(
                    f"{path}:{number}: field '{name}' must be an integer, got {obj[name]!r}.",
                    'Example: {"input": "...", "k": 3}',
                )
        for name in ("temperature", "top_p", "repetition_penalty"):
            if name in obj and (not isinstance(obj[name], int | float) or isinstance(obj[name], bool)):
                raise InputError(
                    f"{path}:{number}: field '{name}' must be a number, got {obj[name]!r}.",
                    'Example: {"input": "...", "temperature": 0.7, "seed": 1}',
                )
        if "compose" in obj and obj["compose"] not in COMPOSE_MODES:
            raise InputError(
                f"{path}:{number}: compose '{obj['compose']}' is not one of {', '.join(COMPOSE_MODES)}.",
                'Example: {"input": "...", "compose": "mixture"}',
            )
        seed = None if sampling.seed is None else (sampling.seed + i) % 2**64
        fields = {
            name: obj[name] for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed") if name in obj
        }
        own = replace(sampling, **{"seed": seed, **fields})
        problem = own.problem()
        if problem is not None:  # here, not when the engine checks it: before minutes of loading
            name, value, rule = problem
            raise InputError(
                f"{path}:{number}: field '{name}' = {value} {rule}.", 'Example: {"input": "...", "temperature": 0.7}'
            )
        requests.append(
            Request(example.input, obj.get("k"), obj.get("compose"), obj.get("max_new_tokens"), sampling=own)
        )
    return requests
