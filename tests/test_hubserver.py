"""The real huggingface_hub client, unmodified, against tests/hubserver.py."""

import json
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hubserver import TOKEN
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

README = """---
license: mit
library_name: peft
base_model: google/flan-t5-base
tags:
- lora
- lorahub
datasets: [super_glue, "glue"]
---
# An adapter
"""


def safetensors_like() -> bytes:
    """A safetensors layout (u64 header length, JSON header, raw data) whose data covers every byte value."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [512], "data_offsets": [0, 512]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(range(256)) * 2


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


def download(hub, repo_id, filename, tmp_path, **kwargs) -> bytes:
    path = hf_hub_download(repo_id, filename, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", **kwargs)
    return Path(path).read_bytes()


def test_create_repo_conflicts_unless_exist_ok(hub, api):
    url = api.create_repo("alice/adapter")
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("alice/adapter")
    assert conflict.value.response.status_code == 409
    assert api.create_repo("alice/adapter", exist_ok=True) == url
    assert url.repo_id == "alice/adapter" and hub.repo_exists("alice/adapter")
    assert not hub.repo_exists("alice/adapter", repo_type="dataset")


def test_upload_folder_then_snapshot_download_is_byte_identical(hub, api, tmp_path):
    local = {
        "README.md": README.encode(),
        "adapter_config.json": b'{"r": 4}',
        "adapter_model.safetensors": safetensors_like(),
        "nested/dir/notes.txt": b"line\r\nwith CRLF\x00and NUL",
    }
    folder = tmp_path / "adapter"
    for name, data in local.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    api.create_repo("alice/adapter")

    sha = api.upload_folder(folder_path=folder, repo_id="alice/adapter").oid

    assert sha == hub.head("alice/adapter") and hub.files("alice/adapter") == local
    snapshot = Path(snapshot_download("alice/adapter", revision=sha, endpoint=hub.endpoint, cache_dir=tmp_path / "c"))
    downloaded = {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
    assert downloaded == local


def test_hf_hub_download_from_a_dataset_repo(hub, tmp_path):
    hub.commit("org/data", {"train.jsonl": b'{"x": 1}\n', "README.md": b"# data"}, repo_type="dataset")

    assert download(hub, "org/data", "train.jsonl", tmp_path, repo_type="dataset") == b'{"x": 1}\n'
    assert any(path.startswith("/datasets/org/data/resolve/main/") for _, path, _ in hub.requests)


def test_repo_info_reports_sha_siblings_and_card(hub, api):
    sha = hub.commit("alice/adapter", {"README.md": README.encode(), "weights/a.bin": b"1234"})
    hub.commit("org/data", {"d.csv": b"a,b\n"}, repo_type="dataset")

    info = api.model_info("alice/adapter")

    assert info.sha == sha and info.author == "alice" and not info.private
    assert {(s.rfilename, s.size) for s in info.siblings} == {("README.md", len(README)), ("weights/a.bin", 4)}
    assert info.card_data.base_model == "google/flan-t5-base"
    assert info.card_data.datasets == ["super_glue", "glue"]
    assert info.library_name == "peft"
    assert set(info.tags) >= {"lora", "lorahub", "peft", "license:mit"}
    assert api.repo_info("org/data", repo_type="dataset").siblings[0].rfilename == "d.csv"
    assert api.model_info("alice/adapter", revision=sha).sha == sha


def test_listings_follow_pagination_and_filter(hub, api):
    hub.page_size = 2
    alice = [f"alice/lora-{i}" for i in range(5)]
    for repo_id in [*alice, "bob/lora-x", "alice/other"]:
        hub.commit(repo_id, {"f": b"x"})
    hub.commit("alice/lora-data", {"f": b"x"}, repo_type="dataset")

    assert [m.id for m in api.list_models(author="alice", search="lora")] == alice
    pages = [path for method, path, _ in hub.requests if path.startswith("/api/models?")]
    assert len(pages) == 3
    assert len(list(api.list_models(search="LORA", limit=3))) == 3
    assert {m.id for m in api.list_models()} == {*alice, "bob/lora-x", "alice/other"}
    assert [d.id for d in api.list_datasets(author="alice")] == ["alice/lora-data"]


def test_missing_repo_revision_and_file_raise_the_client_errors(hub, api, tmp_path):
    hub.commit("alice/adapter", {"a.txt": b"a"})

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/missing")
    with pytest.raises(RepositoryNotFoundError):
        download(hub, "alice/missing", "a.txt", tmp_path)
    with pytest.raises(RevisionNotFoundError):
        download(hub, "alice/adapter", "a.txt", tmp_path, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/adapter", revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        download(hub, "alice/adapter", "b.txt", tmp_path)


def test_token_reaches_the_server_and_whoami_works(hub):
    assert HfApi(endpoint=hub.endpoint, token="hf_secret").whoami()["name"] == hub.user
    assert hub.requests[-1][2]["authorization"] == "Bearer hf_secret"
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{hub.endpoint}/api/whoami-v2")
    assert anonymous.value.code == 401


def test_fail_breaks_only_that_repo(hub, api, tmp_path):
    hub.commit("alice/good", {"a.txt": b"good"})
    hub.commit("alice/broken", {"a.txt": b"broken"})
    hub.fail("alice/broken", status=503)

    with pytest.raises(HfHubHTTPError) as failure:
        api.model_info("alice/broken")
    assert failure.value.response.status_code == 503
    assert download(hub, "alice/good", "a.txt", tmp_path) == b"good"

    hub.unfail("alice/broken")
    assert download(hub, "alice/broken", "a.txt", tmp_path) == b"broken"


def test_new_commit_moves_main_and_old_sha_stays_downloadable(hub, api, tmp_path):
    first = hub.commit("alice/adapter", {"w.bin": b"v1"})
    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="w.bin", repo_id="alice/adapter").oid

    assert second != first and hub.head("alice/adapter") == second
    assert download(hub, "alice/adapter", "w.bin", tmp_path / "a", revision=first) == b"v1"
    assert download(hub, "alice/adapter", "w.bin", tmp_path / "b") == b"v2"


def test_commits_to_new_branches_pull_requests_and_deletions(hub, api, tmp_path):
    main = hub.commit("alice/adapter", {"keep.txt": b"k", "old/a.txt": b"a", "old/b.txt": b"b"})

    api.create_branch("alice/adapter", branch="frozen")
    api.create_branch("alice/adapter", branch="frozen", exist_ok=True)
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id="alice/adapter", revision="dev")
    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="pr.txt", repo_id="alice/adapter", create_pr=True)
    api.delete_file("keep.txt", repo_id="alice/adapter", revision="dev")
    api.delete_folder("old", repo_id="alice/adapter")

    assert hub.files("alice/adapter", revision="dev") == {"dev.txt": b"dev", "old/a.txt": b"a", "old/b.txt": b"b"}
    assert pr.pr_revision == "refs/pr/1"
    assert download(hub, "alice/adapter", "pr.txt", tmp_path, revision=pr.pr_revision) == b"pr"
    assert hub.files("alice/adapter", revision=main) == {"keep.txt": b"k", "old/a.txt": b"a", "old/b.txt": b"b"}
    assert hub.files("alice/adapter") == {"keep.txt": b"k"}
    assert hub.head("alice/adapter", branch="frozen") == main


def test_private_repo_is_invisible_without_a_token(hub, api):
    hub.commit("alice/secret", {"a.txt": b"a"}, private=True)
    anonymous = HfApi(endpoint=hub.endpoint, token=False)

    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("alice/secret")
    assert [m.id for m in anonymous.list_models(author="alice")] == []
    assert api.model_info("alice/secret").private
    assert [m.id for m in api.list_models(author="alice")] == ["alice/secret"]


def test_subprocess_reaches_the_server_through_hf_endpoint(hub, hub_env, tmp_path):
    sha = hub.commit("alice/adapter", {"adapter_config.json": b'{"r": 4}'}, private=True)
    code = "from huggingface_hub import snapshot_download; print(snapshot_download('alice/adapter', cache_dir='cache'))"

    run = subprocess.run(
        [sys.executable, "-c", code], env=hub_env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )

    assert run.returncode == 0, run.stderr
    snapshot = Path(run.stdout.strip())
    assert snapshot.name == sha and (snapshot / "adapter_config.json").read_bytes() == b'{"r": 4}'
    assert all(headers.get("authorization") == f"Bearer {TOKEN}" for _, _, headers in hub.requests)
