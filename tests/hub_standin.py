"""A local stand-in for the Hugging Face Hub's HTTP API, enough for ``create_repo`` + ``upload_folder``.

Serves ``whoami-v2``, ``validate-yaml`` (the card's front matter), ``repos/create``, ``preupload`` (every file "regular", so contents travel inline
in the commit) and ``commit``, and writes each committed file under ``root/<repo_id>/``; the real
``huggingface_hub`` client runs against it (``HF_ENDPOINT=<url>``), so the test exercises elm's push
and the client's protocol, with no network.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml


class HubStandIn:
    def __init__(self, root: Path, user: str = "elm-tester"):
        self.root, self.user, self.requests = Path(root), user, []
        self.repos: dict[str, dict] = {}
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                standin.requests.append(("GET", self.path))
                if self.path.startswith("/api/whoami-v2"):
                    if not self.headers.get("Authorization", "").startswith("Bearer "):
                        return self._reply(401, {"error": "Invalid credentials"})
                    role = "read" if self.headers["Authorization"].endswith("hf_read") else "write"
                    return self._reply(200, {"type": "user", "name": standin.user,
                                             "auth": {"type": "access_token", "accessToken": {"role": role}}})
                self._reply(404, {"error": f"not served by the stand-in: {self.path}"})

            def do_POST(self):
                standin.requests.append(("POST", self.path))
                body = self._body()
                if self.path == "/api/validate-yaml":  # the README's front matter, as the hub checks it
                    errors = standin.validate_card(json.loads(body)["content"])
                    return self._reply(400 if errors else 200, {"errors": [{"message": e} for e in errors]})
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req.get('organization') or standin.user}/{req['name']}"
                    private = req.get(
                        "private", req.get("visibility", "public") != "public"
                    )  # older / newer clients
                    standin.repos.setdefault(repo_id, {"private": private, "commits": []})
                    return self._reply(
                        200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id}
                    )
                parts = self.path.split("?")[0].split("/")  # /api/models/<ns>/<name>/<op>/<rev>
                if len(parts) >= 7 and parts[1] == "api" and parts[2] == "models":
                    repo_id, op = f"{parts[3]}/{parts[4]}", parts[5]
                    if repo_id not in standin.repos:
                        return self._reply(404, {"error": f"Repository {repo_id} not found"})
                    if op == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(
                            200,
                            {
                                "files": [
                                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                    for f in files
                                ]
                            },
                        )
                    if op == "commit":
                        return self._reply(200, standin._commit(repo_id, body))
                self._reply(404, {"error": f"not served by the stand-in: {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def validate_card(content: str) -> list[str]:
        """The checks the hub makes on a model card's front matter that a card writer can get wrong."""
        if not content.startswith("---\n"):
            return ["no YAML front matter"]
        try:
            meta = yaml.safe_load(content.split("---\n")[1])
        except yaml.YAMLError as err:
            return [f"front matter is not YAML: {err}"]
        errors = [] if isinstance(meta, dict) else ["front matter is not a mapping"]
        meta = meta if isinstance(meta, dict) else {}
        for key in ("license", "pipeline_tag", "base_model"):
            if key in meta and not isinstance(meta[key], str):
                errors.append(f"{key} must be a string")
        for entry in meta.get("model-index", []):
            for result in entry.get("results", []):
                if "task" not in result or not all(
                    "type" in m and "value" in m for m in result.get("metrics", [])
                ):
                    errors.append("model-index results need a task and metrics with type and value")
        return errors

    def _commit(self, repo_id: str, body: bytes) -> dict:
        header, files = None, []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file":
                value = item["value"]
                target = self.root / repo_id / value["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(value["content"]))
                files.append(value["path"])
        oid = f"{len(self.repos[repo_id]['commits']) + 1:040x}"
        self.repos[repo_id]["commits"].append(
            {"summary": (header or {}).get("summary"), "files": files, "oid": oid}
        )
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
