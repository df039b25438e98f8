"""fastpeft.hub (+ config/checkpoint loading through it) on a fake, offline Hugging Face Hub cache."""

import json
import os
import subprocess
import sys
import time

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants, errors

from fastpeft import checkpoint as ck
from fastpeft.config import CONFIG_NAME, IA3Config, LoraConfig, PeftConfig
from fastpeft.hub import AdapterFormatError, AdapterNotFoundError, resolve_file

SHA_MAIN = "a" * 40
SHA_V2 = "b" * 40
REPO = "owner/adapter"


def _snapshot(cache, repo, sha, files, ref=None):
    """Write files into the huggingface_hub cache layout: models--owner--name/{refs,snapshots}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for name, content in files.items():
        path = root / "snapshots" / sha / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict) and all(isinstance(v, torch.Tensor) for v in content.values()):
            ck.save_adapter_weights(content, str(path.parent))
        elif isinstance(content, (dict, list)):
            path.write_text(json.dumps(content))
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if ref:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(sha)
    return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hub whose cache holds REPO at two revisions (main, v2) with a subfolder."""
    cache = tmp_path / "hub"
    lora = LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    lora["target_modules"] = ["q_proj"]
    _snapshot(cache, REPO, SHA_MAIN, {
        CONFIG_NAME: lora,
        ck.SAFETENSORS_WEIGHTS_NAME: {"base_model.model.q_proj.lora_A.weight": torch.ones(4, 8)},
        f"sub/{CONFIG_NAME}": {"peft_type": "IA3", "target_modules": ["k"]},
    }, ref="main")
    _snapshot(cache, REPO, SHA_V2, {CONFIG_NAME: {**lora, "r": 16}}, ref="v2")
    torch.save({"k.ia3_l": torch.ones(3)}, str(cache / f"models--owner--adapter/snapshots/{SHA_MAIN}/sub/{ck.WEIGHTS_NAME}"))
    # huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE once, at import: patch the constants it uses
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_local_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_text("x")
    assert resolve_file(str(tmp_path), "f.txt", subfolder="sub") == str(tmp_path / "sub" / "f.txt")
    assert resolve_file(tmp_path / "sub", "f.txt") == str(tmp_path / "sub" / "f.txt")
    assert resolve_file(str(tmp_path), "g.txt", required=False) is None
    with pytest.raises(AdapterNotFoundError, match=r"g\.txt.*local folder") as info:
        resolve_file(str(tmp_path), "g.txt")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_repo_id_from_cache(hub_cache):
    path = resolve_file(REPO, CONFIG_NAME)
    assert path.startswith(str(hub_cache)) and SHA_MAIN in path
    cfg = PeftConfig.from_pretrained(REPO)
    assert isinstance(cfg, LoraConfig) and cfg.r == 4 and cfg.target_modules == {"q_proj"}
    weights = ck.load_adapter_weights(REPO)
    assert torch.equal(weights["base_model.model.q_proj.lora_A.weight"], torch.ones(4, 8))


def test_revision_by_branch_and_commit(hub_cache):
    assert PeftConfig.from_pretrained(REPO, revision="v2").r == 16
    assert PeftConfig.from_pretrained(REPO, revision=SHA_V2).r == 16
    assert PeftConfig.from_pretrained(REPO, revision="main").r == 4
    with pytest.raises(AdapterNotFoundError, match=r"owner/adapter.*v3"):
        PeftConfig.from_pretrained(REPO, revision="v3")


def test_subfolder(hub_cache):
    cfg = PeftConfig.from_pretrained(REPO, subfolder="sub")
    assert isinstance(cfg, IA3Config) and cfg.target_modules == {"k"}
    assert torch.equal(ck.load_adapter_weights(REPO, subfolder="sub")["k.ia3_l"], torch.ones(3))


def test_explicit_cache_dir(hub_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/nonexistent-cache")
    assert PeftConfig.from_pretrained(REPO, cache_dir=str(hub_cache)).r == 4
    assert set(ck.load_adapter_weights(REPO, cache_dir=str(hub_cache))) == {"base_model.model.q_proj.lora_A.weight"}
    with pytest.raises(AdapterNotFoundError):
        PeftConfig.from_pretrained(REPO)


def test_unknown_repo_fails_fast(hub_cache):
    start = time.monotonic()
    with pytest.raises(AdapterNotFoundError, match=r"owner/does-not-exist.*offline") as info:
        PeftConfig.from_pretrained("owner/does-not-exist")
    assert "adapter_config.json" in str(info.value)
    with pytest.raises(AdapterNotFoundError, match="owner/does-not-exist"):
        ck.load_adapter_weights("owner/does-not-exist")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("bad_id", ["not a//valid id", "/no/such/local/folder", "../also-missing"])
def test_invalid_repo_id(hub_cache, bad_id):
    start = time.monotonic()
    with pytest.raises(AdapterNotFoundError, match="not a local folder and not a valid") as info:
        PeftConfig.from_pretrained(bad_id)
    assert bad_id in str(info.value)
    assert time.monotonic() - start < 5


def test_repo_without_config_or_weights(hub_cache):
    _snapshot(hub_cache, "owner/empty", SHA_MAIN, {"README.md": "hi"}, ref="main")
    with pytest.raises(AdapterNotFoundError, match=r"adapter_config\.json.*owner/empty"):
        PeftConfig.from_pretrained("owner/empty")
    with pytest.raises(AdapterNotFoundError, match=r"owner/empty.*adapter_model\.safetensors.*adapter_model\.bin"):
        ck.load_adapter_weights("owner/empty")
    assert resolve_file("owner/empty", CONFIG_NAME, required=False) is None


def test_folder_without_config(tmp_path):
    with pytest.raises(AdapterNotFoundError, match=r"adapter_config\.json.*local folder"):
        PeftConfig.from_pretrained(str(tmp_path))


def test_bad_files_in_cache(hub_cache):
    _snapshot(hub_cache, "owner/bad", SHA_MAIN, {
        CONFIG_NAME: "{ this is not json",
        f"unknown/{CONFIG_NAME}": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4},
        ck.SAFETENSORS_WEIGHTS_NAME: {"w": torch.ones(100)},
    }, ref="main")
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json.*not a valid JSON"):
        PeftConfig.from_pretrained("owner/bad")
    with pytest.raises(ValueError, match=r"adapter_config\.json.*'PROMPT_TUNING'.*LORA"):
        PeftConfig.from_pretrained("owner/bad", subfolder="unknown")
    weights = hub_cache / f"models--owner--bad/snapshots/{SHA_MAIN}/{ck.SAFETENSORS_WEIGHTS_NAME}"
    weights.write_bytes(weights.read_bytes()[:60])
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors"):
        ck.load_adapter_weights("owner/bad")


def test_malicious_bin_in_cache(hub_cache, tmp_path):
    marker = tmp_path / "pwned"
    snap = _snapshot(hub_cache, "owner/evil", SHA_MAIN, {CONFIG_NAME: {"peft_type": "LORA"}}, ref="main")
    with open(snap / "snapshots" / SHA_MAIN / ck.WEIGHTS_NAME, "wb") as fh:
        fh.write(_evil_pickle(str(marker)))
    with pytest.raises(AdapterFormatError, match=r"Refusing.*adapter_model\.bin"):
        ck.load_adapter_weights("owner/evil")
    assert not marker.exists()


def _evil_pickle(path):
    """A pickle whose loading would create ``path`` (built by hand: no class needed to load it)."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (path,))

    return pickle.dumps({"w": Payload()}, protocol=2)


def _response(status=404):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/owner/x"))


@pytest.mark.parametrize("exc,match", [
    (lambda: errors.RepositoryNotFoundError("404", response=_response()), "no Hugging Face Hub repo 'owner/x'"),
    (lambda: errors.GatedRepoError("403", response=_response(403)), "gated"),
    (lambda: errors.RevisionNotFoundError("404", response=_response()), "revision 'r9' not found"),
    (lambda: errors.RemoteEntryNotFoundError("404", response=_response()), "has no file 'f.json'"),
    (lambda: errors.OfflineModeIsEnabled("offline"), "owner/x.*OfflineModeIsEnabled"),
    (lambda: ConnectionError("network down"), "owner/x.*network down"),
    (lambda: errors.HfHubHTTPError("500 server error", response=_response(500)), "owner/x.*500"),
])
def test_hub_errors_are_converted(monkeypatch, exc, match):
    def fake_download(*args, **kwargs):
        raise exc()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(AdapterNotFoundError, match=match) as info:
        resolve_file("owner/x", "f.json", revision="r9")
    assert isinstance(info.value.__cause__, Exception)


@pytest.mark.parametrize("status", [500, 503, 429])
def test_http_error_behind_a_cache_miss_is_reported_with_its_status(monkeypatch, status):
    """huggingface_hub turns an HTTP error of its metadata call into LocalEntryNotFoundError when
    the file is not cached: the message must give the status, not "unreachable"."""

    def fake_download(*args, **kwargs):
        try:
            raise errors.HfHubHTTPError(f"{status} Server Error", response=_response(status))
        except errors.HfHubHTTPError as http:
            raise errors.LocalEntryNotFoundError("An error happened while trying to locate the file") from http

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(AdapterNotFoundError, match=f"answered HTTP {status}") as info:
        resolve_file("owner/x", "f.json")
    assert "unreachable" not in str(info.value)


def test_missing_entry_is_optional(monkeypatch):
    def fake_download(*args, **kwargs):
        raise errors.RemoteEntryNotFoundError("404", response=_response())

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_file("owner/x", "f.json", required=False) is None


def test_real_environment_variables_offline(hub_cache, tmp_path):
    """With HF_HUB_OFFLINE=1 / HF_HUB_CACHE set before import, a fresh process resolves from the
    cache and fails fast for an unknown repo."""
    code = (
        "import time, sys\n"
        "from fastpeft.config import PeftConfig\n"
        "from fastpeft.hub import AdapterNotFoundError\n"
        f"assert PeftConfig.from_pretrained({REPO!r}).r == 4\n"
        "t = time.monotonic()\n"
        "try:\n"
        "    PeftConfig.from_pretrained('owner/missing')\n"
        "except AdapterNotFoundError as e:\n"
        "    assert 'owner/missing' in str(e)\n"
        "else:\n"
        "    sys.exit('no error')\n"
        "assert time.monotonic() - t < 5\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache),
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
