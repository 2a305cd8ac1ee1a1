"""`lorahub push`: the real huggingface_hub client against the loopback Hub of tests/hubserver.py.

A composition of three tiny T5 adapters is pushed, downloaded back and must give the same logits,
bit for bit, as the local folder. Every check runs before the first request.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hubserver import TOKEN
from huggingface_hub import HfApi, snapshot_download
from peft import PeftModel
from safetensors.torch import save_file
from test_registry_hub import online  # noqa: F401  (fixture)
from tiny_models import (
    logits,
    make_adapters,
    one_thread,  # noqa: F401  (fixture)
    tiny_batch,
    tiny_t5,
)

from lorahub_cli import __version__
from lorahub_cli.cards.card import Card, TextRecipe
from lorahub_cli.compose.adapters import load_adapter
from lorahub_cli.compose.folder import write_composition
from lorahub_cli.compose.formulas import combine
from lorahub_cli.compose.recipe import Recipe as ComposeRecipe
from lorahub_cli.errors import HubError, InputError
from lorahub_cli.publish import DEFAULT_MESSAGE, check_folder, push_folder

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = [0.7, -0.4, 1.1]
TASK_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "lorahub_recipe.json"]


def recipe(weights=WEIGHTS) -> ComposeRecipe:
    return ComposeRecipe(
        level="task",
        base_model="tiny-random/t5",
        task_type="SEQ_2_SEQ_LM",
        formula="elementwise",
        modules=[
            {"id": f"lib/a{i}", "source": f"lib/a{i}", "revision": None, "sha256": "0" * 64, "weight": w}
            for i, w in enumerate(weights)
        ],
        versions={"lorahub": __version__, "torch": torch.__version__, "transformers": "x", "peft": "x"},
        shots={"count": 5, "sha256": "0" * 64},
        search=None,
        loss=1.0,
    )


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return [load_adapter(path) for path in make_adapters(tiny_t5(), folder, 3)]


@pytest.fixture(scope="module")
def composed_dir(adapters, tmp_path_factory) -> Path:
    """What `lorahub compose --out` writes for a task-level composition; tests push copies of it."""
    adapter = combine(adapters, WEIGHTS, "elementwise")
    out = tmp_path_factory.mktemp("composed") / "composition"
    return write_composition(out, recipe(), [adapter])


@pytest.fixture
def composed(composed_dir, tmp_path) -> Path:
    return Path(shutil.copytree(composed_dir, tmp_path / "composition"))


def instance_folder(adapters, out: Path) -> Path:
    """An instance-level folder (two shots) written by the compose pipeline itself."""
    shots = [combine(adapters, w, "elementwise", name=f"shot-{j}") for j, w in enumerate([WEIGHTS, [0.2, 0.5, -0.3]])]
    entries = [
        {"shot": j, "folder": f"compositions/shot-{j}", "modules": recipe().modules, "search": None, "loss": 1.0}
        for j in range(2)
    ]
    full = dataclasses.replace(
        recipe(),
        level="instance",
        modules=[],
        loss=None,
        compositions=entries,
        router={"file": "router.safetensors", "embedder": "e@1", "instruction": "", "shots": ["a", "b"]},
    )
    return write_composition(out, full, shots, torch.randn(2, 8))


def all_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_pushed_adapter_gives_identical_logits(online, composed, tmp_path):
    # Strays that must stay local: notes, a temp file left by an editor, a scratch folder.
    (composed / "notes.txt").write_text("private notes")
    (composed / ".adapter_model.safetensors.tmp").write_bytes(b"partial")
    (composed / "scratch").mkdir()
    (composed / "scratch" / "x.json").write_text("{}")
    before = all_files(composed)
    result = push_folder(composed, "me/composed")
    assert result.files == TASK_FILES and result.branch == "main"
    assert result.url == f"{online.endpoint}/me/composed" and result.commit == online.head("me/composed")
    uploaded = online.files("me/composed")
    assert uploaded == {name: before[name] for name in TASK_FILES}
    assert all_files(composed) == before, "push writes nothing into the folder"
    assert not any(TOKEN.encode() in data for data in uploaded.values())

    downloaded = snapshot_download(
        "me/composed", revision=result.commit, endpoint=online.endpoint, cache_dir=tmp_path / "cache"
    )
    batch = tiny_batch(tiny_t5(), rows=3)
    with torch.no_grad():
        local = logits(PeftModel.from_pretrained(tiny_t5(), str(composed)).eval(), batch)
        remote = logits(PeftModel.from_pretrained(tiny_t5(), downloaded).eval(), batch)
        assert torch.equal(local, remote)
        assert not torch.allclose(local, logits(tiny_t5(), batch)), "the composed adapter changes the logits"

    card = HfApi(endpoint=online.endpoint).model_info("me/composed").card_data
    assert card.base_model == "tiny-random/t5" and card.library_name == "peft" and "lorahub" in card.tags


def test_embedding_card_travels_with_the_adapter(online, composed):
    Card(
        embedder_id="sentence-transformers/x",
        embedder_revision="1",
        text_recipe=TextRecipe(),
        n_examples=3,
        centroid=torch.nn.functional.normalize(torch.randn(8), dim=0),
        nearest=[],
    ).save(composed)
    result = push_folder(composed, "me/with-card")
    assert result.files == sorted(TASK_FILES + ["lorahub_card.json", "lorahub_card.safetensors"])
    assert set(online.files("me/with-card")) == set(result.files)


def test_branch_private_and_a_second_push(online, composed):
    first = push_folder(composed, "me/private", private=True, branch="exp", message="first version")
    api = HfApi(endpoint=online.endpoint)
    assert api.model_info("me/private").private is True
    assert first.url == f"{online.endpoint}/me/private/tree/exp" and first.branch == "exp"
    assert set(online.files("me/private", revision="exp")) == set(TASK_FILES)
    assert online.files("me/private") == {}, "main keeps only the initial commit"
    assert online._repos["model", "me/private"].commits[first.commit].message == "first version"

    # Nothing changed: the client skips the empty commit and reports the branch's head.
    again = push_folder(composed, "me/private", private=True, branch="exp")
    assert again.commit == first.commit == online.head("me/private", branch="exp")

    write_composition(
        composed,
        dataclasses.replace(recipe(), shots={"count": 6, "sha256": "1" * 64}),
        [load_adapter(composed)],
        overwrite=True,
    )
    changed = push_folder(composed, "me/private", branch="exp")
    assert changed.commit != first.commit == online._repos["model", "me/private"].commits[changed.commit].parent
    assert online._repos["model", "me/private"].commits[changed.commit].message == DEFAULT_MESSAGE


def test_private_does_not_change_an_existing_repo(online, composed):
    push_folder(composed, "me/public")
    warnings = []
    push_folder(composed, "me/public", private=True, warn=warnings.append)
    assert HfApi(endpoint=online.endpoint).model_info("me/public").private is False
    assert warnings == ["'me/public' already exists and is public; --private only applies when push creates the repo."]


def test_instance_level_folder_is_pushed_whole(online, adapters, tmp_path):
    folder = instance_folder(adapters, tmp_path / "per-example")
    result = push_folder(folder, "me/per-example")
    shots = [f"compositions/shot-{j}/{name}" for j in range(2) for name in TASK_FILES]
    assert result.files == sorted(["README.md", "lorahub_recipe.json", "router.safetensors", *shots])
    assert online.files("me/per-example") == {name: (folder / name).read_bytes() for name in result.files}


def break_folder(folder: Path, case: str) -> None:
    """Damage a composition folder in one way."""
    config = folder / "adapter_config.json"
    if case == "no config":
        config.unlink()
    elif case == "no weights":
        (folder / "adapter_model.safetensors").unlink()
    elif case == "pickle":
        (folder / "old").mkdir()
        (folder / "old" / "adapter_model.bin").write_bytes(b"not really a pickle")
    elif case == "no recipe":
        (folder / "lorahub_recipe.json").unlink()
    elif case == "bad recipe":
        (folder / "lorahub_recipe.json").write_text("{not json")
    elif case == "bad weights":
        (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    elif case == "extra weights":
        save_file({"base_model.model.shared.weight": torch.zeros(2, 2)}, folder / "adapter_model.safetensors")
    elif case == "bad config":
        # load_adapter accepts it, but peft.LoraConfig refuses it.
        config.write_text(
            json.dumps({**json.loads(config.read_text()), "target_modules": "q", "layers_to_transform": [0]})
        )
    elif case == "half a card":
        (folder / "lorahub_card.json").write_text("{}")


BROKEN = {
    "no config": "has no adapter_config.json",
    "no weights": "has no adapter_model.safetensors",
    "pickle": r"adapter_model.bin' is a pickle file; push uploads safetensors only",
    "no recipe": "has no lorahub_recipe.json",
    "bad recipe": r"lorahub_recipe.json is not valid JSON",
    "bad weights": "does not load",
    "extra weights": "holds 'base_model.model.shared.weight', which is not a LoRA A/B weight",
    "bad config": "does not load .ValueError: `layers_to_transform` cannot be used",
    "half a card": "has no embedding card",
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_folder_is_refused_before_any_request(online, composed, case):
    break_folder(composed, case)
    with pytest.raises(InputError, match=BROKEN[case]) as error:
        push_folder(composed, "me/broken")
    assert error.value.hint and "\n" not in str(error.value)
    assert online.requests == []


def test_instance_level_checks(adapters, tmp_path):
    folder = instance_folder(adapters, tmp_path / "per-example")
    (folder / "compositions" / "shot-1" / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match=r"shot-1' has no adapter_model.safetensors"):
        check_folder(folder)
    shutil.rmtree(folder / "compositions" / "shot-1")
    with pytest.raises(
        InputError, match="lists composition folder 'compositions/shot-1', which is not a folder inside"
    ):
        check_folder(folder)
    recipe_path = folder / "lorahub_recipe.json"
    full = json.loads(recipe_path.read_text())
    # The recipe is read by Recipe.load: an entry is checked field by field before its folder is followed.
    recipe_path.write_text(json.dumps({**full, "compositions": [{"folder": "../../adapters"}]}))
    with pytest.raises(InputError, match=r"field 'compositions\[0\].shot' is missing"):
        check_folder(folder)
    outside = {**full["compositions"][0], "folder": "../../adapters"}
    recipe_path.write_text(json.dumps({**full, "compositions": [outside]}))
    with pytest.raises(InputError, match="lists composition folder '../../adapters'"):
        check_folder(folder)
    recipe_path.write_text(json.dumps({**full, "compositions": full["compositions"][:1]}))
    (folder / "router.safetensors").unlink()
    with pytest.raises(InputError, match="instance-level composition without router.safetensors"):
        check_folder(folder)
    recipe_path.write_text(json.dumps({**full, "level": "batch"}))
    with pytest.raises(InputError, match="field 'level' is 'batch', not task or instance"):
        check_folder(folder)


@pytest.mark.parametrize(
    "repo", ["my-lora", "me/my-lora/extra", "me/", "/my-lora", "me/my lora", "me/my..lora", "me/-lora"]
)
def test_repo_id_must_be_namespace_slash_name(online, composed, repo):
    with pytest.raises(InputError, match=f"--repo '{repo}' is not a Hub repo id"):
        push_folder(composed, repo)
    assert online.requests == []


def test_missing_folder(online, tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        push_folder(tmp_path / "nope", "me/x")


def test_no_token_says_how_to_log_in(online, composed, monkeypatch, tmp_path):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(HubError, match="needs a Hugging Face token with write access") as error:
        push_folder(composed, "me/x")
    assert "hf auth login" in error.value.hint and "HF_TOKEN" in error.value.hint
    assert online.requests == []


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_token_is_named(online, composed, status):
    online.fail("me/locked", status=status)
    with pytest.raises(HubError, match=rf"refused to let this token write to 'me/locked' \(HTTP {status}\)") as error:
        push_folder(composed, "me/locked")
    assert "hf auth login" in error.value.hint and TOKEN not in str(error.value)


def test_unreachable_endpoint_names_hf_endpoint(online, composed, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubError, match="cannot reach the Hub at http://127.0.0.1:9") as error:
        push_folder(composed, "me/x")
    assert "HF_ENDPOINT" in error.value.hint


# Runs the real entry point; registers `push` only if app.py does not yet.
LORAHUB = """\
from lorahub_cli.cli import app
if "push" not in {c.name for c in app.app.registered_commands}:
    from lorahub_cli.cli.push import EXAMPLES, push
    app.app.command("push", epilog=EXAMPLES)(push)
app.main()
"""


def test_cli_end_to_end(hub, hub_env, composed, tmp_path):
    env = {**hub_env, "LORAHUB_HOME": str(tmp_path / "home"), "NO_COLOR": "1"}

    def lorahub(*args):
        return subprocess.run(
            [sys.executable, "-c", LORAHUB, "push", *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    bad = lorahub(composed, "--repo", "my-lora")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines()[-1].startswith("Error: --repo 'my-lora' is not a Hub repo id. Use NAMESPACE/NAME")

    done = lorahub(composed, "--repo", "me/cli-lora", "--branch", "v1", "-m", "from the CLI", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {
        "repo": "me/cli-lora",
        "url": f"{hub.endpoint}/me/cli-lora/tree/v1",
        "commit": hub.head("me/cli-lora", branch="v1"),
        "branch": "v1",
        "files": TASK_FILES,
    }
    assert "Pushing" in done.stderr and "4 files on me/cli-lora@v1 at commit" in done.stderr
    assert hub._repos["model", "me/cli-lora"].commits[result["commit"]].message == "from the CLI"
    # The token was sent, and went nowhere else.
    assert any(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h in hub.requests)
    written = [*hub.files("me/cli-lora", revision="v1").values(), *all_files(tmp_path).values()]
    assert not any(TOKEN.encode() in data for data in written)
    assert TOKEN not in done.stdout + done.stderr + bad.stderr
