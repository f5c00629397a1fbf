"""--model resolution: local folders, the Hugging Face cache layout, aliases, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.model_source import _REPO_ID, ALIASES, ModelSourceError, resolve_model

MAIN = "a" * 40
V1 = "b" * 40


def make_cached(cache: Path, repo_id: str, commit: str, refs: tuple[str, ...] = ("main",),
                config: bool = True) -> Path:
    """The Hugging Face cache layout: models--Org--Name/{refs/<ref>, snapshots/<commit>/}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    if config:
        (snapshot / "config.json").write_text('{"model_type": "qwen2"}')
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    cache = tmp_path / "hub"
    make_cached(cache, "Qwen/QwQ-32B", MAIN)
    make_cached(cache, "Qwen/QwQ-32B", V1, refs=("v1",))
    return cache


def test_local_folder_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_local_folder_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="has no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("path", ["/nonexistent/model", "./models/missing", "~/no/such/model"])
def test_missing_local_path(path: str) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(path)


def test_model_id_found_in_cache(cache: Path) -> None:
    folder = resolve_model("Qwen/QwQ-32B", cache_dir=cache)
    assert folder == (cache / "models--Qwen--QwQ-32B" / "snapshots" / MAIN).resolve()


@pytest.mark.parametrize("alias", ["qwq-32b", "QwQ-32B"])
def test_alias(cache: Path, alias: str) -> None:
    assert resolve_model(alias, cache_dir=cache).name == MAIN


def test_aliases_are_model_ids() -> None:
    assert ALIASES["llama-3.1-8b-instruct"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert ALIASES["qwen2.5-7b-instruct"] == "Qwen/Qwen2.5-7B-Instruct"
    assert all(_REPO_ID.match(repo_id) for repo_id in ALIASES.values())


@pytest.mark.parametrize("revision, commit", [("v1", V1), (V1, V1), ("main", MAIN)])
def test_revision(cache: Path, revision: str, commit: str) -> None:
    assert resolve_model("qwq-32b", cache_dir=cache, revision=revision).name == commit


def test_not_cached_without_auto_download(cache: Path) -> None:
    with pytest.raises(ModelSourceError, match="not in .*pass --auto_download.*--model /path"):
        resolve_model("qwen2.5-7b-instruct", cache_dir=cache)
    with pytest.raises(ModelSourceError, match="revision v2"):
        resolve_model("qwq-32b", cache_dir=cache, revision="v2")


def test_incomplete_snapshot(tmp_path: Path) -> None:
    make_cached(tmp_path, "Org/Broken", MAIN, config=False)
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model("Org/Broken", cache_dir=tmp_path)


def test_unknown_name_lists_aliases() -> None:
    with pytest.raises(ModelSourceError, match="neither a folder .* aliases: .*qwq-32b"):
        resolve_model("not-a-model")


def test_offline_download_is_a_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A closed local port: the download fails at once and never leaves the machine.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelSourceError) as err:
        resolve_model("qwen2.5-7b-instruct", cache_dir=cache, auto_download=True, timeout=2)
    message = str(err.value)
    assert "cannot be reached" in message and "127.0.0.1:9" in message
    assert "HF_ENDPOINT" in message and "--model /path/to/model-folder" in message


def test_modelscope_missing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("modelscope", "modelscope.hub", "modelscope.hub.snapshot_download"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(ModelSourceError, match="pip install modelscope"):
        resolve_model("qwq-32b", provider="modelscope", cache_dir=cache)


def test_unknown_provider() -> None:
    with pytest.raises(ModelSourceError, match="unknown model provider"):
        resolve_model("qwq-32b", provider="s3")
