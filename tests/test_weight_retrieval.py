"""Weight cards in the registry: made at every add, ranked where a data card is missing (`--by auto`), one scale
for a mixed ranking, damage named with its fix, and `registry verify` / `rebuild` knowing them (issue 21)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import EXAMPLES
from tiny_models import make_lora_adapter, one_thread, save_tiny_base  # noqa: F401  (fixture)

from lorahub_cli import api
from lorahub_cli.cards.data import CardOptions
from lorahub_cli.registry import Store
from lorahub_cli.registry.mirror import add_local
from lorahub_cli.registry.store import WEIGHT_CARD

pytestmark = pytest.mark.usefixtures("one_thread")

CARDED = ["capitals", "addition", "sentiment"]  # adapters with a data card
BARE = ["w0", "w1", "w2"]  # adapters added without data: weight cards only
SHOTS = EXAMPLES / "shots" / "capitals.jsonl"


@pytest.fixture(scope="module")
def mixed_library(tmp_path_factory):
    """A tiny T5 on disk and six adapters added as `registry add` adds them (each with its weight card, in the
    same commit); the first three also get a data card."""
    root = tmp_path_factory.mktemp("weight-library")
    model = save_tiny_base("t5", root / "base")
    home = root / "home"
    store = Store(home, weight_card=api._weight_card)
    for seed, name in enumerate(CARDED + BARE):
        folder = make_lora_adapter(model, root / "adapters" / name, seed=seed, base_model_name=str(root / "base"))
        card = CardOptions(data=EXAMPLES / "data" / f"{name}.jsonl") if name in CARDED else None
        api.add(str(folder), name=name, card=card, store=store)
    return home


@pytest.fixture
def home(mixed_library, lorahub_home):
    shutil.copytree(mixed_library, lorahub_home)
    return lorahub_home


def ranked(cli, *args) -> dict:
    result = cli("retrieve", "--shots", SHOTS, "-k", "6", "--json", *args)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def z(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False))}


def test_every_add_makes_a_weight_card_recorded_with_its_hash(home, cli):
    listed = json.loads(cli("registry", "list", "--json").stdout)
    assert {r["id"]: r["has_weight_card"] for r in listed} == dict.fromkeys(CARDED + BARE, True)
    assert {r["id"]: r["has_card"] for r in listed} == {i: i in CARDED for i in CARDED + BARE}
    for record in Store(home).list():
        assert (record.path / WEIGHT_CARD).is_file() and len(record.files[WEIGHT_CARD]) == 64


def test_auto_ranks_an_adapter_with_a_data_card_by_it_and_the_rest_by_their_weight_cards(home, cli):
    """Under auto, each data-carded adapter's own score is its cosine under --by data, each other adapter's its
    score under --by weights; the ranking is by z-scores, each kind standardised over its own adapters (the data
    cosines over the data-carded, the weight scores over every adapter with a weight card)."""
    auto, data, weights = ranked(cli), ranked(cli, "--by", "data"), ranked(cli, "--by", "weights")
    assert (auto["by"], data["by"], weights["by"]) == ("mixed", "data", "weights")
    assert sorted(m["id"] for m in data["results"]) == sorted(CARDED)  # --by data: only the data-carded
    assert sorted(m["id"] for m in weights["results"]) == sorted(CARDED + BARE)  # --by weights: every adapter
    cosine = {m["id"]: m["score"] for m in data["results"]}
    weight = {m["id"]: m["score"] for m in weights["results"]}
    assert len(auto["results"]) == 6
    data_scale, weight_scale = z(list(cosine.values())), z(list(weight.values()))
    for m in auto["results"]:
        if m["id"] in CARDED:
            assert m["card"] == "data" and m["raw"] == pytest.approx(cosine[m["id"]], abs=2e-6)
            scale = data_scale
        else:
            assert m["card"] == "weights" and m["raw"] == pytest.approx(weight[m["id"]], abs=2e-6)
            scale = weight_scale
        assert m["score"] == pytest.approx((m["raw"] - scale["mean"]) / scale["std"], abs=1e-4)
    zs = [m["score"] for m in auto["results"]]
    assert zs == sorted(zs, reverse=True)


def test_auto_is_data_alone_when_every_adapter_has_a_data_card(home, cli):
    store = Store(home)
    for name in BARE:
        store.remove(name)
    auto, data = ranked(cli), ranked(cli, "--by", "data")
    assert auto == data and auto["by"] == "data"


def test_the_weights_alone_rank_a_library_added_without_data(home, cli):
    store = Store(home)
    for name in CARDED:
        store.remove(name)
    auto = ranked(cli)
    assert auto["by"] == "weights" and sorted(m["id"] for m in auto["results"]) == sorted(BARE)
    assert auto["weights"]["dtype"] == "float32"
    compose = cli("compose", "--shots", SHOTS, "-n", "2", "--budget", "3", "--out", home.parent / "out", "--json")
    assert compose.code == 0, compose.stderr
    summary = json.loads(compose.stdout)
    assert summary["by"] == "weights" and {m["id"] for m in summary["modules"]} <= set(BARE)


def test_a_corrupted_weight_card_is_a_one_line_error_naming_rebuild_which_repairs_it(home, cli):
    record = Store(home).get("w1")
    card = record.path / WEIGHT_CARD
    data = bytearray(card.read_bytes())
    data[-8:] = b"\x00" * 8
    card.write_bytes(bytes(data))
    result = cli("retrieve", "--shots", SHOTS, "--by", "weights")
    assert result.code != 0 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "w1" in result.stderr and "lorahub registry rebuild" in result.stderr, result.stderr
    verify = cli("registry", "verify", "--json")
    assert verify.code != 0
    assert [(p["id"], p["file"]) for p in json.loads(verify.stdout)["problems"]] == [("w1", WEIGHT_CARD)]
    rebuilt = cli("registry", "rebuild", "--json")
    assert rebuilt.code == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout)["weight_cards"]["built"] == ["w1"]
    assert cli("registry", "verify").code == 0
    assert ranked(cli, "--by", "weights")["by"] == "weights"


def test_rebuild_makes_the_weight_cards_an_older_registry_lacks_and_verify_lists_them(tmp_path, lorahub_home, cli):
    model = save_tiny_base("t5", tmp_path / "base")
    store = Store(lorahub_home)  # no weight-card builder: a registry from before weight cards
    for seed, name in enumerate(["old0", "old1"]):
        add_local(store, make_lora_adapter(model, tmp_path / name, seed=seed, base_model_name=str(tmp_path / "base")))
    assert not any(r.has_weight_card for r in store.list())
    before = json.loads(cli("registry", "verify", "--json").stdout)
    assert before["ok"] and before["without_weight_card"] == ["old0", "old1"]
    rebuilt = json.loads(cli("registry", "rebuild", "--json").stdout)
    assert rebuilt["weight_cards"] == {"built": ["old0", "old1"], "failed": []}
    after = json.loads(cli("registry", "verify", "--json").stdout)
    assert after["ok"] and after["without_weight_card"] == []
    assert all(r.has_weight_card for r in Store(lorahub_home).list())


def test_auto_ranks_the_data_cards_and_names_the_rest_when_the_base_model_cannot_be_loaded(home, cli, monkeypatch):
    """Offline, say: the adapters with a data card are still ranked; the others are named, with the reason."""
    from lorahub_cli import models
    from lorahub_cli.errors import NotFoundError

    def unreachable(name, **_):
        raise NotFoundError(f"cannot reach the Hub for '{name}'.", "Pass its folder (--model-path).")

    monkeypatch.setattr(models, "load_base_model", unreachable)
    result = cli("retrieve", "--shots", SHOTS, "-k", "6", "--json")
    assert result.code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["by"] == "data" and sorted(m["id"] for m in answer["results"]) == sorted(CARDED)
    assert answer["weights"]["not_ranked"]["ids"] == BARE
    assert "3 adapter(s) without a data card were not ranked" in result.stderr and "cannot reach" in result.stderr
    forced = cli("retrieve", "--shots", SHOTS, "--by", "weights")
    assert forced.code != 0 and forced.stderr.count("\n") == 1 and "cannot reach the Hub" in forced.stderr
