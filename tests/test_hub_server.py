"""Round trips through the real huggingface_hub / transformers / peft clients against `LocalHubServer`.

Nothing is mocked: the clients talk HTTP to the local server (see `tests/hub_fixtures.py` for how they are pointed
at it). Models are built from tiny configs, so no test downloads anything.
"""

from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from peft_cvae.testing_utils import tiny_llama
from tests.hub_server import LocalHubServer

INPUT_IDS = torch.tensor([[1, 5, 9, 17, 33, 63]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def test_hub_env_points_the_already_imported_clients_at_the_local_hub(hub_env: LocalHubServer, tmp_path: Path):
    import transformers.utils.hub

    assert constants.ENDPOINT == hub_env.url
    assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(hub_env.url + "/")
    assert Path(constants.HF_HUB_CACHE).is_relative_to(tmp_path)
    assert transformers.utils.hub.hf_api().endpoint == hub_env.url
    assert HfApi().whoami()["name"] == "user"  # HF_TOKEN is sent


def test_transformers_push_to_hub_then_from_pretrained(hub_env: LocalHubServer):
    model = tiny_llama(seed=0)
    model.push_to_hub("user/tiny-llama")

    assert {"config.json", "model.safetensors"} <= set(hub_env.list_files("user/tiny-llama"))
    assert HfApi().file_exists("user/tiny-llama", "model.safetensors")

    reloaded = AutoModelForCausalLM.from_pretrained("user/tiny-llama").eval()

    assert type(reloaded) is LlamaForCausalLM
    expected, actual = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name
    assert torch.equal(logits(model), logits(reloaded))
    # Sanity check that the comparison can fail: another seed gives other weights.
    assert not torch.equal(logits(tiny_llama(seed=1)), logits(reloaded))


def test_peft_push_to_hub_then_peft_model_from_pretrained(hub_env: LocalHubServer):
    peft_model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # lora_B starts at zero: make the adapter matter
    peft_model.eval()
    assert not torch.equal(logits(peft_model), logits(tiny_llama(seed=0)))

    peft_model.push_to_hub("user/tiny-lora")

    files = set(hub_env.list_files("user/tiny-lora"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files  # only the adapter travels

    reloaded = PeftModel.from_pretrained(tiny_llama(seed=0), "user/tiny-lora").eval()

    assert torch.equal(logits(peft_model), logits(reloaded))
    lora_expected = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    lora_actual = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert lora_expected.keys() == lora_actual.keys() and lora_expected
    for name, tensor in lora_expected.items():
        assert torch.equal(tensor, lora_actual[name]), name


def test_dataset_repo_upload_folder_snapshot_download_and_hf_hub_download(hub_env: LocalHubServer, tmp_path: Path):
    folder = tmp_path / "bank"
    (folder / "tasks" / "task_0").mkdir(parents=True)
    (folder / "index.json").write_text('{"tasks": ["task_0"]}')
    (folder / "tasks" / "task_0" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (folder / "tasks" / "task_0" / "empty.txt").write_bytes(b"")

    api = HfApi()
    repo_url = api.create_repo("user/lora-bank", repo_type="dataset")
    assert repo_url.repo_type == "dataset" and repo_url.repo_id == "user/lora-bank"
    commit = api.upload_folder(folder_path=folder, repo_id="user/lora-bank", repo_type="dataset")
    assert commit.oid == hub_env.head("user/lora-bank", repo_type="dataset")

    expected_files = ["index.json", "tasks/task_0/empty.txt", "tasks/task_0/weights.bin"]
    repo_files = api.list_repo_files("user/lora-bank", repo_type="dataset")
    assert sorted(repo_files) == sorted([".gitattributes", *expected_files])
    assert not hub_env.repo_exists("user/lora-bank")  # a dataset repo is not a model repo
    assert api.file_exists("user/lora-bank", "index.json", repo_type="dataset")
    assert not api.file_exists("user/lora-bank", "index.json")  # wrong repo type

    snapshot = Path(snapshot_download("user/lora-bank", repo_type="dataset"))
    assert snapshot.is_relative_to(tmp_path)  # the fresh per-test HF_HOME
    for name in expected_files:
        assert (snapshot / name).read_bytes() == (folder / name).read_bytes()
    assert snapshot.name == commit.oid

    single = hf_hub_download("user/lora-bank", "tasks/task_0/weights.bin", repo_type="dataset", revision=commit.oid)
    assert Path(single).read_bytes() == (folder / "tasks/task_0/weights.bin").read_bytes()

    info = api.dataset_info("user/lora-bank", files_metadata=True)
    sizes = {sibling.rfilename: sibling.size for sibling in info.siblings}
    assert info.sha == commit.oid and sizes["tasks/task_0/weights.bin"] == 256 * 40
    top_level = {entry.path for entry in api.list_repo_tree("user/lora-bank", repo_type="dataset")}
    assert top_level == {".gitattributes", "index.json", "tasks"}
    paths_info = api.get_paths_info("user/lora-bank", ["index.json", "tasks", "nope"], repo_type="dataset")
    assert [entry.path for entry in paths_info] == ["index.json", "tasks"]


def test_second_commit_overwrites_and_deletes_and_old_revision_stays_readable(hub_env: LocalHubServer):
    api = HfApi()
    api.create_repo("user/history")
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="weights.txt", repo_id="user/history")
    api.upload_file(path_or_fileobj=b"short-lived", path_in_repo="notes.txt", repo_id="user/history")
    api.upload_file(path_or_fileobj=b"doomed", path_in_repo="extra/old.txt", repo_id="user/history")
    before_second = hub_env.head("user/history")
    assert before_second != first.oid

    second = api.create_commit(
        "user/history",
        operations=[
            CommitOperationAdd(path_in_repo="weights.txt", path_or_fileobj=b"version two"),
            CommitOperationDelete(path_in_repo="notes.txt"),
            CommitOperationDelete(path_in_repo="extra/"),  # a folder
        ],
        commit_message="overwrite and delete",
        parent_commit=before_second,
    )

    assert api.list_repo_files("user/history") == [".gitattributes", "weights.txt"]
    assert hub_env.read_file("user/history", "notes.txt", revision=before_second) == b"short-lived"
    assert api.model_info("user/history").sha == second.oid
    latest = hf_hub_download("user/history", "weights.txt")
    assert Path(latest).read_bytes() == b"version two"
    for deleted in ("notes.txt", "extra/old.txt"):
        with pytest.raises(EntryNotFoundError):
            hf_hub_download("user/history", deleted)

    old = hf_hub_download("user/history", "weights.txt", revision=before_second)
    assert Path(old).read_bytes() == b"v1"
    old_deleted = hf_hub_download("user/history", "extra/old.txt", revision=before_second)
    assert Path(old_deleted).read_bytes() == b"doomed"
    assert sorted(api.list_repo_files("user/history", revision=first.oid)) == [".gitattributes", "weights.txt"]
    assert [c.commit_id for c in api.list_repo_commits("user/history")][:2] == [second.oid, before_second]

    # Unchanged files are skipped by the client (preupload reports the remote oid): no new commit is made.
    again = api.upload_file(path_or_fileobj=b"version two", path_in_repo="weights.txt", repo_id="user/history")
    assert again.oid == second.oid == hub_env.head("user/history")

    # A stale parent commit is refused.
    with pytest.raises(HfHubHTTPError) as stale:
        api.upload_file(
            path_or_fileobj=b"v3", path_in_repo="weights.txt", repo_id="user/history", parent_commit=before_second
        )
    assert stale.value.response.status_code == 412


def test_missing_repo_file_and_revision_raise_the_clients_usual_errors(hub_env: LocalHubServer):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/does-not-exist", "config.json")
    assert not api.repo_exists("user/does-not-exist")

    api.create_repo("user/sparse")
    assert api.repo_exists("user/sparse")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/sparse", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/sparse", ".gitattributes", revision="no-such-branch")
    assert not api.file_exists("user/sparse", "config.json")

    with pytest.raises(OSError, match="does-not-exist"):
        AutoModelForCausalLM.from_pretrained("user/does-not-exist")


def test_create_repo_exist_ok_and_conflict(hub_env: LocalHubServer):
    api = HfApi()
    url = api.create_repo("user/twice")
    assert api.create_repo("user/twice", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("user/twice")
    assert conflict.value.response.status_code == 409
    assert api.whoami()["name"] == "user"


def test_range_requests_and_headers(hub_env: LocalHubServer):
    api = HfApi()
    api.create_repo("user/ranges", repo_type="dataset")
    payload = bytes(range(100))
    api.upload_file(path_or_fileobj=payload, path_in_repo="blob.bin", repo_id="user/ranges", repo_type="dataset")
    url = f"{hub_env.url}/datasets/user/ranges/resolve/main/blob.bin"

    head = httpx2.head(url)
    assert head.status_code == 200
    assert head.headers["Content-Length"] == "100"
    assert head.headers["X-Repo-Commit"] == hub_env.head("user/ranges", repo_type="dataset")
    assert (
        head.headers["ETag"].strip('"')
        == api.get_paths_info("user/ranges", "blob.bin", repo_type="dataset")[0].blob_id
    )

    partial = httpx2.get(url, headers={"Range": "bytes=10-19"})
    assert partial.status_code == 206 and partial.content == payload[10:20]
    assert partial.headers["Content-Range"] == "bytes 10-19/100"
    assert httpx2.get(url, headers={"Range": "bytes=-5"}).content == payload[-5:]
    assert httpx2.get(url, headers={"Range": "bytes=500-"}).status_code == 416

    missing = httpx2.head(f"{hub_env.url}/datasets/user/ranges/resolve/main/nope.bin")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
    assert httpx2.head(f"{hub_env.url}/user/ranges/resolve/main/blob.bin").headers["X-Error-Code"] == "RepoNotFound"
    assert not hub_env.errors
