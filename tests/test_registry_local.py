"""The store and local mirroring: formats, conversion, validation, integrity, concurrency and kills."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import EXAMPLES
from safetensors.torch import load_file

from lorahub_cli.errors import InputError, IntegrityError, NotFoundError
from lorahub_cli.io import sha256_file
from lorahub_cli.registry import Store
from lorahub_cli.registry.mirror import add_local

ADAPTER = EXAMPLES / "adapters" / "sentiment"


def test_add_local_records_everything(lorahub_home):
    store = Store(lorahub_home)
    result = add_local(store, ADAPTER, name="sent")
    record = store.get("sent")
    assert result.status == "added"
    assert record.source == str(ADAPTER.resolve()) and record.source_type == "local" and record.revision is None
    assert (record.base_model, record.r, record.lora_alpha, record.target_modules) == (
        "lorahub-examples/tiny-t5",
        4,
        8.0,
        ["q", "v"],
    )
    assert record.task_type == "SEQ_2_SEQ_LM" and record.peft_type == "LORA" and not record.has_card
    assert record.files["adapter_model.safetensors"] == sha256_file(ADAPTER / "adapter_model.safetensors")
    assert record.size == sum((record.path / f).stat().st_size for f in record.files)
    assert add_local(store, ADAPTER, name="sent").status == "updated"
    assert [r.id for r in store.list()] == ["sent"]
    assert len(list((lorahub_home / "adapters").rglob("adapter_config.json"))) == 1, "the old version must be deleted"


def test_pickle_adapter_is_converted_with_weights_only(tmp_path, lorahub_home):
    folder = tmp_path / "old-style"
    folder.mkdir()
    shutil.copy(ADAPTER / "adapter_config.json", folder)
    state = load_file(ADAPTER / "adapter_model.safetensors")
    torch.save(state, folder / "adapter_model.bin")
    store = Store(lorahub_home)
    add_local(store, folder)
    record = store.get("old-style")
    assert "adapter_model.bin" not in record.files
    assert record.converted_from == {"file": "adapter_model.bin", "sha256": sha256_file(folder / "adapter_model.bin")}
    converted = load_file(record.path / "adapter_model.safetensors")
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    assert any(v.abs().sum() > 0 for k, v in converted.items() if "lora_B" in k), "tests need non-zero B"


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(tmp_path, lorahub_home):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(ADAPTER / "adapter_config.json", folder)
    torch.save({"x": Evil()}, folder / "adapter_model.bin")
    with pytest.raises(InputError, match="cannot be loaded safely"):
        add_local(Store(lorahub_home), folder)
    assert Store(lorahub_home).list() == []


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_not_a_lora_and_wrong_base_model(tmp_path, lorahub_home):
    store = Store(lorahub_home)
    with pytest.raises(InputError, match="has no adapter_config.json"):
        add_local(store, tmp_path)
    prefix = tmp_path / "prefix"
    shutil.copytree(ADAPTER, prefix)
    edit_config(prefix, peft_type="PREFIX_TUNING")
    with pytest.raises(InputError, match=r"'prefix' is not a LoRA adapter \(peft_type 'PREFIX_TUNING'\)"):
        add_local(store, prefix)
    with pytest.raises(InputError, match="was trained on 'lorahub-examples/tiny-t5', not 'google/flan-t5-large'"):
        add_local(store, ADAPTER, base_model="google/flan-t5-large")
    assert store.list() == []
    assert list((lorahub_home / "tmp").iterdir()) == [], "failed adds leave no staging folders"


def test_verify_catches_corruption_and_truncation(lorahub_home, cli):
    store = Store(lorahub_home)
    add_local(store, ADAPTER, name="a")
    add_local(store, EXAMPLES / "adapters" / "addition", name="b")
    assert store.verify() == ([], [])
    weights = store.get("a").path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    config = store.get("b").path / "adapter_config.json"
    config.write_bytes(config.read_bytes()[:10])
    problems, _ = store.verify()
    assert {(p["id"], p["file"]) for p in problems} == {
        ("a", "adapter_model.safetensors"),
        ("b", "adapter_config.json"),
    }
    with pytest.raises(IntegrityError):
        store.check_file(store.get("a"), "adapter_model.safetensors")
    result = cli("registry", "verify", "--json")
    assert result.code == 1 and json.loads(result.stdout)["ok"] is False
    assert "2 stored file(s) are missing or corrupted" in result.stderr


def test_remove(lorahub_home):
    store = Store(lorahub_home)
    add_local(store, ADAPTER, name="x/y")
    path = store.get("x/y").path
    store.remove("x/y")
    assert not path.exists() and store.find("x/y") is None
    with pytest.raises(NotFoundError, match="adapter 'x/y' is not in the registry"):
        store.get("x/y")


ADD_MANY = """
import sys
from pathlib import Path
from lorahub_cli.registry import Store
from lorahub_cli.registry.mirror import add_local
store = Store(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    for task in sorted(p.name for p in Path(sys.argv[2]).iterdir()):
        add_local(store, Path(sys.argv[2]) / task, name=f"{sys.argv[4]}-{task}-{i}")
"""


def run_add_many(home, prefix, rounds):
    return subprocess.Popen(
        [sys.executable, "-c", ADD_MANY, str(home), str(EXAMPLES / "adapters"), str(rounds), prefix]
    )


def test_two_processes_adding_at_once(lorahub_home):
    procs = [run_add_many(lorahub_home, p, 3) for p in ("left", "right")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    store = Store(lorahub_home)
    assert len(store.list()) == 2 * 3 * 8
    assert store.verify() == ([], [])


def test_sigkill_during_adds_leaves_a_consistent_registry(lorahub_home):
    proc = run_add_many(lorahub_home, "k", 50)
    store = Store(lorahub_home)
    deadline = time.time() + 60
    while len(store.list()) < 10 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = store.list()
    assert 10 <= len(listed) < 400
    assert store.verify()[0] == [], "every listed adapter is complete"
    # A re-run completes the work, and removes the killed process's staging folder.
    assert run_add_many(lorahub_home, "k", 50).wait(timeout=300) == 0
    assert len(store.list()) == 400 and store.verify()[0] == []
    assert list((lorahub_home / "tmp").iterdir()) == []


def test_a_config_without_lora_alpha_records_the_alpha_peft_applies(tmp_path, lorahub_home):
    """PEFT's LoraConfig assumes lora_alpha 8 when a config omits it; the index and the loaded adapter agree."""
    from peft import LoraConfig

    from lorahub_cli.compose.adapters import load_adapter

    folder = tmp_path / "no-alpha"
    shutil.copytree(ADAPTER, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["lora_alpha"]
    assert config["r"] != LoraConfig().lora_alpha  # else the old fallback (alpha = r) would pass unnoticed
    (folder / "adapter_config.json").write_text(json.dumps(config))
    store = Store(lorahub_home)
    add_local(store, folder)
    record = store.get("no-alpha")
    assert record.lora_alpha == LoraConfig().lora_alpha == load_adapter(folder).lora_alpha
    store.rebuild()
    assert store.get("no-alpha").lora_alpha == LoraConfig().lora_alpha
