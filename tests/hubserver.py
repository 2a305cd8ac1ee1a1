"""An in-memory Hugging Face Hub look-alike that the real `huggingface_hub` client can talk to.

Tests start it on 127.0.0.1 (port 0) and point the client at `hub.endpoint`, either with `endpoint=`
(in-process: `HF_ENDPOINT` is read when huggingface_hub is imported) or with the `hub_env` fixture
(subprocesses). Model and dataset repos live in memory; every file is served as a regular git file, so
uploads and downloads never touch LFS or Xet storage.

Like the real Hub, writes need a token (any `Bearer` token is accepted and belongs to `hub.user`),
private repos look missing to anonymous requests, and errors carry the `X-Error-Code` header that
`huggingface_hub.utils.hf_raise_for_status` turns into RepositoryNotFoundError, RevisionNotFoundError
and EntryNotFoundError.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import socket
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest

TOKEN = "hf_hubserver_test_token"  # what `hub_env` logs subprocesses in with
USER = "test-user"
PAGE_SIZE = 1000  # the real Hub's page size for listings
URL_KINDS = {"models": "model", "datasets": "dataset"}  # /api/{kind}/... -> repo type
URL_PREFIXES = {"model": "", "dataset": "datasets/"}  # repo type -> prefix of its web URLs
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


class HubError(Exception):
    """An error answer: the status, the Hub's X-Error-Code (if any) and a JSON body."""

    def __init__(self, status: int, code: str | None, message: str, *, headers=None, extra=None):
        super().__init__(message)
        self.status, self.code, self.headers, self.extra = status, code, headers or {}, extra or {}


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]  # the whole tree at this commit, path -> content
    date: datetime


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created: datetime
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> sha of its head

    def resolve(self, revision: str) -> Commit:
        sha = self.branches.get(revision) or (revision if COMMIT_SHA.fullmatch(revision) else None)
        if sha not in self.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return self.commits[sha]


@dataclass
class Request:
    method: str
    segments: list[str]  # URL path split on "/" then unquoted, so "refs%2Fpr%2F1" stays one segment
    query: dict[str, list[str]]
    token: str | None
    body: bytes


class HubServer:
    """Threaded HTTP server holding repos in memory; use as a context manager or call start()/stop()."""

    def __init__(self, *, user: str = USER, page_size: int = PAGE_SIZE):
        self.user = user
        self.page_size = page_size  # lower it to make listings paginate with few repos
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, lower-cased headers)
        self._repos: dict[tuple[str, str], Repo] = {}
        self._failing: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()  # guards everything above: handlers run on many threads
        self._shas = itertools.count()  # makes every commit sha unique, even for identical content
        self._httpd: _Server | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> HubServer:
        # The socket listens once the constructor returns, so clients may connect before serve_forever runs.
        self._httpd = _Server(("127.0.0.1", 0), _Handler, hub=self)
        # stop() waits for the serve loop to notice, which it checks every poll_interval (0.5 s by default).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="hubserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # --- Python API for tests ----------------------------------------------------------------------

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        message: str = "seed",
        branch: str = "main",
        private: bool = False,
    ) -> str:
        """Add or overwrite `files` on `branch` (created from main if new), creating the repo if needed."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id)) or self._create_repo(repo_type, repo_id, private)
            parent = self._parent(repo, branch)
            return self._add_commit(repo, branch, parent, message, {**parent.files, **files})

    def files(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            return dict(self._repos[repo_type, repo_id].resolve(revision).files)

    def head(self, repo_id: str, *, repo_type: str = "model", branch: str = "main") -> str:
        with self._lock:
            return self._repos[repo_type, repo_id].branches[branch]

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def fail(self, repo_id: str, status: int = 500, repo_type: str = "model") -> None:
        """Answer `status` to every request about this repo (listings still show it).

        The client retries 429 and 5xx for about 23 s before giving up in hf_hub_download, list_repo_tree
        and preupload (upload_*): pass a 4xx such as 403 to fail fast there. model_info, repo_info,
        snapshot_download and create_repo give up at once.
        """
        with self._lock:
            self._failing[repo_type, repo_id] = status

    def unfail(self, repo_id: str, repo_type: str = "model") -> None:
        with self._lock:
            self._failing.pop((repo_type, repo_id), None)

    # --- state (callers hold self._lock) -----------------------------------------------------------

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        if repo_id.count("/") != 1:
            raise ValueError(f"hubserver repo ids are 'namespace/name', got {repo_id!r}")
        repo = self._repos[repo_type, repo_id] = Repo(repo_type, repo_id, private, _now())
        # The real Hub gives a new repo a first commit, so `main` always resolves.
        self._add_commit(repo, "main", None, "initial commit", {})
        return repo

    def _parent(self, repo: Repo, branch: str, fork_from: str = "main") -> Commit:
        """The commit a commit to `branch` builds on: its head, or `fork_from` if the branch is new."""
        return repo.resolve(branch if branch in repo.branches else fork_from)

    def _add_commit(self, repo: Repo, branch: str, parent: Commit | None, message: str, files) -> str:
        parent_sha = parent.sha if parent else None
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parent_sha}\n{message}\n{next(self._shas)}"
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = Commit(sha, parent_sha, message, files, _now())
        repo.branches[branch] = sha
        return sha

    def _repo(self, req: Request, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not req.token):
            # Like the Hub: 401 to anonymous callers (the repo may be private), 404 to authenticated ones.
            raise HubError(404 if req.token else 401, "RepoNotFound", f"Repository not found: {repo_id}")
        return repo

    def _check_failing(self, repo_type: str, repo_id: str) -> None:
        if (status := self._failing.get((repo_type, repo_id))) is not None:
            raise HubError(status, None, f"hubserver: {repo_id} is set to fail")

    def _info(self, repo: Repo, commit: Commit) -> dict:
        card = _card_data(commit.files.get("README.md", b""))
        info = {
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": _tags(card),
            "cardData": card,
            "createdAt": _iso(repo.created),
            "lastModified": _iso(commit.date),
            "siblings": [
                {"rfilename": path, "size": len(data), "blobId": _git_blob_sha(data)}
                for path, data in sorted(commit.files.items())
            ],
        }
        if repo.repo_type == "model":  # the Hub lifts these two out of a model's card
            info |= {"library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag")}
        return info

    def _url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # --- HTTP routes: each returns (status, JSON-able or bytes, headers) ---------------------------

    def _route(self, req: Request):
        with self._lock:
            match req.segments:
                case ["api", "whoami-v2"]:
                    return self._whoami(req)
                case ["api", "repos", "create"] if req.method == "POST":
                    return self._create(req)
                case ["api", "validate-yaml"] if req.method == "POST":
                    return 200, {"errors": [], "warnings": []}, {}
                case ["api", kind] if kind in URL_KINDS and req.method == "GET":
                    return self._list(req, URL_KINDS[kind])
                case ["api", kind, ns, name, *rest] if kind in URL_KINDS:
                    return self._repo_api(req, URL_KINDS[kind], f"{ns}/{name}", rest)
                case ["datasets", ns, name, "resolve", revision, *path] if path:
                    return self._resolve(req, "dataset", f"{ns}/{name}", revision, "/".join(path))
                case [ns, name, "resolve", revision, *path] if path:
                    return self._resolve(req, "model", f"{ns}/{name}", revision, "/".join(path))
        raise HubError(404, None, f"hubserver: no route for {req.method} /{'/'.join(req.segments)}")

    def _whoami(self, req: Request):
        if not req.token:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        token = {"type": "access_token", "accessToken": {"displayName": "hubserver", "role": "write"}}
        return 200, {"type": "user", "name": self.user, "fullname": self.user, "orgs": [], "auth": token}, {}

    def _create(self, req: Request):
        _require_token(req)
        payload = json.loads(req.body)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        self._check_failing(repo_type, repo_id)
        if repo := self._repos.get((repo_type, repo_id)):
            # create_repo(exist_ok=True) swallows this 409; the client reads the URL from its body.
            raise HubError(409, None, "You already created this repo", extra={"url": self._url(repo)})
        private = payload.get("visibility") == "private" or payload.get("private") is True
        return 200, {"url": self._url(self._create_repo(repo_type, repo_id, private))}, {}

    def _list(self, req: Request, repo_type: str):
        q = {key: values[-1] for key, values in req.query.items()}
        author, search = q.get("author"), q.get("search", "").lower()
        wanted_tags = req.query.get("filter", [])
        matches = []
        for repo in sorted(self._repos.values(), key=lambda r: r.repo_id):
            if repo.repo_type != repo_type or (repo.private and not req.token):
                continue
            info = self._info(repo, repo.resolve("main"))
            if (
                (author is None or info["author"] == author)
                and search in repo.repo_id.lower()
                and all(tag in info["tags"] for tag in wanted_tags)
            ):
                matches.append(info)
        # The client sends `limit` as the page size and stops reading after `limit` items itself.
        start, size = int(q.get("cursor", 0)), min(self.page_size, int(q.get("limit", self.page_size)))
        headers = {}
        if start + size < len(matches):
            next_query = urlencode({**req.query, "cursor": [str(start + size)]}, doseq=True)
            headers["Link"] = f'<{self.endpoint}/api/{repo_type}s?{next_query}>; rel="next"'
        return 200, matches[start : start + size], headers

    def _repo_api(self, req: Request, repo_type: str, repo_id: str, rest: list[str]):
        self._check_failing(repo_type, repo_id)
        repo = self._repo(req, repo_type, repo_id)
        match req.method, rest:
            case "GET", []:
                return 200, self._info(repo, repo.resolve("main")), {}
            case "GET", ["revision", revision]:
                return 200, self._info(repo, repo.resolve(revision)), {}
            case "GET", ["tree", revision, *path]:
                recursive = req.query.get("recursive", ["false"])[-1].lower() in ("1", "true")
                return 200, _tree(repo.resolve(revision), "/".join(path), recursive), {}
            case "POST", ["preupload", revision]:
                return self._preupload(req, repo, revision)
            case "POST", ["commit", revision]:
                return self._commit(req, repo, revision)
            case "POST", ["branch", branch]:
                _require_token(req)
                if branch in repo.branches:
                    raise HubError(409, None, f"Reference already exists: refs/heads/{branch}")
                start = json.loads(req.body or b"{}").get("startingPoint", "main")
                repo.branches[branch] = repo.resolve(start).sha
                return 200, {}, {}
        raise HubError(404, None, f"hubserver: no route for {req.method} /{'/'.join(req.segments)}")

    def _preupload(self, req: Request, repo: Repo, revision: str):
        _require_token(req)
        current = self._parent(repo, revision).files
        # "regular" keeps content inline in the commit: "lfs" would send the client to Xet storage.
        # The client skips files whose `oid` equals its local git blob sha, like the real Hub.
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": _git_blob_sha(current[f["path"]]) if f["path"] in current else None,
            }
            for f in json.loads(req.body)["files"]
        ]
        return 200, {"files": files}, {}

    def _commit(self, req: Request, repo: Repo, revision: str):
        _require_token(req)
        create_pr = req.query.get("create_pr", ["0"])[-1] == "1"
        branch = f"refs/pr/{sum(b.startswith('refs/pr/') for b in repo.branches) + 1}" if create_pr else revision
        parent = self._parent(repo, branch, fork_from=revision if create_pr else "main")
        files, message = dict(parent.files), ""
        # Apply every operation to a copy first, so a bad line leaves the repo untouched.
        for line in req.body.splitlines():
            if not line.strip():
                continue
            op = json.loads(line)
            key, value = op["key"], op["value"]
            if key == "header":
                message = value["summary"]
                expected = value.get("parentCommit")
                if expected and not parent.sha.startswith(expected):
                    raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "EntryNotFound", f"{value['path']} does not exist")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                doomed = [path for path in files if path.startswith(prefix)]
                if not doomed:
                    raise HubError(404, "EntryNotFound", f"{value['path']} does not exist")
                for path in doomed:
                    del files[path]
            else:
                raise HubError(400, None, f"hubserver: unsupported commit operation {key!r} (no LFS storage)")
        sha = self._add_commit(repo, branch, parent, message, files)
        answer = {"commitUrl": f"{self._url(repo)}/commit/{sha}", "commitOid": sha}
        if create_pr:
            answer["pullRequestUrl"] = f"{self._url(repo)}/discussions/{branch.rsplit('/', 1)[1]}"
        return 200, answer, {}

    def _resolve(self, req: Request, repo_type: str, repo_id: str, revision: str, path: str):
        if req.method not in ("GET", "HEAD"):
            raise HubError(405, None, f"hubserver: {req.method} on a resolve URL")
        self._check_failing(repo_type, repo_id)
        commit = self._repo(req, repo_type, repo_id).resolve(revision)
        headers = {"X-Repo-Commit": commit.sha}
        if path not in commit.files:
            # The client caches the miss under .no_exist/<X-Repo-Commit>/.
            raise HubError(404, "EntryNotFound", f"{path} does not exist at {revision}", headers=headers)
        data = commit.files[path]
        headers |= {"ETag": f'"{_git_blob_sha(data)}"', "Content-Type": "application/octet-stream"}
        return 200, data, headers


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, *, hub: HubServer):
        super().__init__(address, handler)
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Hang up idle keep-alive connections, whose handler threads would otherwise wait for the client."""
        with self._connections_lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed by the client
                    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: snapshot_download reuses connections across 8 threads

    def do_GET(self):
        hub: HubServer = self.server.hub
        # Read the whole body first, even when answering an error, so the next request on this
        # keep-alive connection starts at the right byte.
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {key.lower(): value for key, value in self.headers.items()}
        with hub._lock:
            hub.requests.append((self.command, self.path, headers))
        url = urlsplit(self.path)
        auth = headers.get("authorization", "")
        req = Request(
            method=self.command,
            segments=[unquote(s) for s in url.path.strip("/").split("/")],
            query=parse_qs(url.query),
            token=auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None,
            body=body,
        )
        try:
            status, payload, extra_headers = hub._route(req)
        except HubError as e:
            status, payload, extra_headers = e.status, {"error": str(e), **e.extra}, dict(e.headers)
            if e.code:
                extra_headers["X-Error-Code"] = e.code
            # Headers are latin-1 only: escape whatever a repo id or path brings in.
            extra_headers["X-Error-Message"] = str(e).encode("ascii", "backslashreplace").decode()
        except Exception:  # a hubserver bug: show it to the test instead of dropping the connection
            status, payload, extra_headers = 500, {"error": traceback.format_exc()}, {}
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
            extra_headers.setdefault("Content-Type", "application/json")
        self.send_response(status)
        for key, value in extra_headers.items():
            self.send_header(key, value)
        # HEAD gets the true length too: the client sizes its download from it.
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format, *args):
        pass  # hub.requests is the log


def _require_token(req: Request) -> None:
    if not req.token:
        raise HubError(401, None, "hubserver: this request needs an 'Authorization: Bearer <token>' header")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(date: datetime) -> str:
    return date.strftime("%Y-%m-%dT%H:%M:%S.") + f"{date.microsecond // 1000:03d}Z"


def _git_blob_sha(data: bytes) -> str:
    """The id git gives a file's content, which the Hub reports as `oid` and ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _tree(commit: Commit, path: str, recursive: bool) -> list[dict]:
    prefix = f"{path}/" if path else ""
    entries = {}
    for file_path, data in commit.files.items():
        if not file_path.startswith(prefix):
            continue
        parts = file_path[len(prefix) :].split("/")
        depth = len(parts) if recursive else 1
        for i in range(1, min(depth, len(parts) - 1) + 1):
            folder = prefix + "/".join(parts[:i])
            # The client requires an oid for folders too; nothing reads it, so any stable id will do.
            entries[folder] = {"type": "directory", "path": folder, "size": 0, "oid": _git_blob_sha(folder.encode())}
        if recursive or len(parts) == 1:
            entries[file_path] = {"type": "file", "path": file_path, "size": len(data), "oid": _git_blob_sha(data)}
    if path and not entries:
        raise HubError(404, "EntryNotFound", f"{path} does not exist at {commit.sha}")
    return [entries[key] for key in sorted(entries)]


def _card_data(readme: bytes) -> dict:
    """The YAML front matter of a README, as the Hub's `cardData`.

    Stdlib only, so this reads the subset model cards use: `key: scalar`, `key: [a, b]` and `key:`
    followed by `- item` lines. Keys holding nested mappings (model-index, widget) are left out.
    """
    match = re.match(r"---\r?\n(.*?)\r?\n---\s*(\n|$)", readme.decode("utf-8", "replace"), re.S)
    if not match:
        return {}
    data, nested, key = {}, set(), None
    for line in match[1].splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if top := re.fullmatch(r"([\w.-]+):\s*(.*?)\s*", line):
            key, value = top.groups()
            data[key] = [] if not value else _yaml_list(value) if value.startswith("[") else _yaml_scalar(value)
        elif (item := re.fullmatch(r"\s*- (.*?)\s*", line)) and ": " not in item[1] and isinstance(data.get(key), list):
            data[key].append(_yaml_scalar(item[1]))
        else:
            nested.add(key)
    return {key: value for key, value in data.items() if key not in nested}


def _yaml_list(flow: str) -> list:
    return [_yaml_scalar(part) for part in flow.strip("[]").split(",") if part.strip()]


def _yaml_scalar(text: str):
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return {"true": True, "false": False, "null": None, "~": None}.get(text, text)


def _tags(card: dict) -> list[str]:
    """Tags the Hub derives from a card: its `tags`, `library_name` and `license:<id>`."""
    tags = card.get("tags") if isinstance(card.get("tags"), list) else []
    tags = [str(tag) for tag in tags]
    if card.get("library_name"):
        tags.append(str(card["library_name"]))
    if card.get("license"):
        tags.append(f"license:{card['license']}")
    return tags


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture
def hub_env(hub, tmp_path) -> dict[str, str]:
    """Environment for a subprocess that talks to `hub`, logged in with TOKEN and with its own HF_HOME."""
    # Drop the developer's HF settings (token, cache paths, offline mode) so they cannot leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "HUGGING_FACE_"))}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(tmp_path / "hf_home"),
        HF_TOKEN=TOKEN,
        HF_HUB_OFFLINE="0",  # also overrides TRANSFORMERS_OFFLINE, which the client reads as a fallback
        HF_HUB_DISABLE_TELEMETRY="1",  # otherwise the first request of a process probes an extra endpoint
    )
    return env
