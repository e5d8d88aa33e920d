"""A stand-in for the Hugging Face Hub, for tests: it takes huggingface_hub.HfApi's place up to the HTTP calls and
keeps what was pushed, per revision, in the layout of the Hub cache (models--owner--name/refs/<branch or tag> holds a
commit id, snapshots/<commit>/ the repository's whole tree at that commit). So huggingface_hub's own
snapshot_download and transformers' from_pretrained read what was pushed, with HF_HUB_OFFLINE=1 and HF_HUB_CACHE
pointing at the stand-in's folder, as they read a real download. commits.jsonl keeps each commit's message and files.

In a subprocess: `huggingface_hub.HfApi = hub_standin.HubStandIn`, its folder in STANDIN_HUB."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace


class HubStandIn:
    def __init__(self, root: Path | None = None, hold_first_commit_until: Path | None = None, **hfapi_arguments):
        """`root`: the stand-in's folder (None: STANDIN_HUB's); `hold_first_commit_until`: the first commit lasts until
        that path exists (at most 60 s), as a slow upload does; HfApi's own arguments (token, endpoint) are unused."""
        self.root, self.hold = Path(root or os.environ["STANDIN_HUB"]), hold_first_commit_until
        self.calls: list[tuple] = []

    def repository(self, repo_id: str) -> Path:
        return self.root / f"models--{repo_id.replace('/', '--')}"

    def commits(self, repo_id: str) -> list[dict]:
        log = self.repository(repo_id) / "commits.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def refs(self, repo_id: str) -> dict[str, str]:
        refs = self.repository(repo_id) / "refs"
        return {path.name: path.read_text() for path in refs.iterdir()} if refs.is_dir() else {}

    def tree(self, repo_id: str, revision: str = "main") -> Path:
        return self.repository(repo_id) / "snapshots" / self.refs(repo_id).get(revision, revision)

    # ---- HfApi's methods, as gpt2repro calls them ----

    def whoami(self, token=None) -> dict:
        self.calls.append(("whoami",))
        return {"name": "tester"}

    def create_repo(self, repo_id: str, *, private=None, exist_ok=False, repo_type=None, **kwargs) -> str:
        self.calls.append(("create_repo", repo_id, private))
        repository = self.repository(repo_id)
        if repository.exists() and not exist_ok:
            raise FileExistsError(f"409: {repo_id} exists")
        (repository / "refs").mkdir(parents=True, exist_ok=True)
        return f"https://huggingface.co/{repo_id}"

    def auth_check(self, repo_id: str, *, write=False, **kwargs) -> None:
        self.calls.append(("auth_check", repo_id, write))

    def list_repo_files(self, repo_id: str, *, revision=None, **kwargs) -> list[str]:
        tree = self.tree(repo_id, revision or "main")
        return sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()) if tree.is_dir() else []

    def create_commit(self, repo_id: str, operations, *, commit_message: str, revision=None, **kwargs):
        held = None  # whether the held commit's wait ended because what it waited for came
        if self.hold is not None and not self.commits(repo_id):
            deadline = time.monotonic() + 60
            while not self.hold.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            held = self.hold.exists()
        branch = revision or "main"
        parent = self.refs(repo_id).get(branch)
        commit = hashlib.sha1(f"{parent}{commit_message}{time.time_ns()}".encode()).hexdigest()
        tree = self.repository(repo_id) / "snapshots" / commit
        if parent is not None:
            shutil.copytree(self.repository(repo_id) / "snapshots" / parent, tree)
        tree.mkdir(parents=True, exist_ok=True)
        added, deleted = [], []
        for operation in operations:
            target = tree / operation.path_in_repo
            if type(operation).__name__ == "CommitOperationDelete":
                shutil.rmtree(target) if target.is_dir() else target.unlink()
                deleted.append(operation.path_in_repo)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(operation.path_or_fileobj, target)
                added.append(operation.path_in_repo)
        (self.repository(repo_id) / "refs" / branch).write_text(commit)  # a Hub cache's refs: no newline
        with open(self.repository(repo_id) / "commits.jsonl", "a") as log:
            log.write(json.dumps({"oid": commit, "message": commit_message, "added": sorted(added),
                                  "deleted": sorted(deleted), "held_until_ready": held}) + "\n")
        return SimpleNamespace(oid=commit, commit_message=commit_message)

    def list_repo_refs(self, repo_id: str, **kwargs):
        tags = [SimpleNamespace(name=name, target_commit=commit) for name, commit in self.refs(repo_id).items()
                if name != "main"]
        return SimpleNamespace(tags=tags)

    def create_tag(self, repo_id: str, *, tag: str, revision=None, exist_ok=False, **kwargs) -> None:
        ref = self.repository(repo_id) / "refs" / tag
        if ref.exists() and not exist_ok:
            raise FileExistsError(f"409: tag {tag} exists")
        ref.write_text(self.refs(repo_id).get(revision or "main", revision))

    def delete_tag(self, repo_id: str, *, tag: str, **kwargs) -> None:
        (self.repository(repo_id) / "refs" / tag).unlink()
