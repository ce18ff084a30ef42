"""Small HTTP servers that answer like SGLang and MLX-LM, which cannot run on these machines.

They follow the servers' documented request and response formats (SGLang's native ``/generate``
and adapter endpoints; MLX-LM's ``/v1/completions`` with ``adapters`` and ``logprobs``), record every
request, and answer deterministically: the n-th generated token is ``(last prompt token + n) % 500``
with logprob ``-0.25 * n``. They are fakes, named so, for the request/response handling only.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeServer:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict | None]] = []
        self.garbage = False  # answer every request with something that is not the format
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                fake.requests.append((self.path, None))
                self._answer(*fake.get(self.path))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                fake.requests.append((self.path, body))
                if fake.garbage:
                    return self._answer(200, b"<html>not json</html>")
                self._answer(*fake.post(self.path, body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def posted(self, path: str) -> list[dict]:
        return [b for p, b in self.requests if p == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def generated(prompt: list[int], n: int) -> list[tuple[int, float]]:
        return [((prompt[-1] + i + 1) % 500, -0.25 * (i + 1)) for i in range(n)]


class FakeSGLangServer(FakeServer):
    def __init__(self, enable_lora: bool = True) -> None:
        self.enable_lora = enable_lora
        self.loaded: dict[str, str] = {}
        super().__init__()

    def get(self, path):
        if path == "/get_model_info":
            return 200, {"model_path": "tiny", "is_generation": True}
        if path == "/get_server_info":
            return 200, {"enable_lora": self.enable_lora, "context_length": 256}
        return 404, {"detail": "Not Found"}

    def post(self, path, body):
        if path == "/load_lora_adapter":
            self.loaded[body["lora_name"]] = body["lora_path"]
            return 200, {"success": True, "loaded_adapters": dict(self.loaded)}
        if path == "/unload_lora_adapter":
            self.loaded.pop(body["lora_name"], None)
            return 200, {"success": True}
        if path == "/generate":
            n = body["sampling_params"]["max_new_tokens"]
            out = []
            for i, prompt in enumerate(body["input_ids"]):
                lora = body.get("lora_path", [None] * len(body["input_ids"]))[i]
                if lora is not None and lora not in self.loaded:
                    return 400, {"error": f"unknown lora {lora}"}
                steps = self.generated(prompt, n)
                meta = {"output_token_logprobs": [[lp, t, None] for t, lp in steps],
                        "finish_reason": {"type": "length", "length": n}}
                if body.get("logprob_start_len") == 0:
                    meta["input_token_logprobs"] = [[None, prompt[0], None]] + [[-1.0, t, None] for t in prompt[1:]]
                out.append({"output_ids": [t for t, _ in steps], "meta_info": meta})
            return 200, out
        return 404, {"detail": "Not Found"}


class FakeMLXServer(FakeServer):
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        super().__init__()

    def get(self, path):
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "tiny", "created": 0}]}
        return 404, {"detail": "Not Found"}

    def post(self, path, body):
        if path != "/v1/completions":
            return 404, {"detail": "Not Found"}
        prompt = self.tokenizer.encode(body["prompt"], add_special_tokens=False)
        steps = self.generated(prompt, body["max_tokens"])
        return 200, {"id": "cmpl-1", "object": "text_completion", "model": "tiny",
                     "choices": [{"index": 0, "finish_reason": "length", "text": "...",
                                  "logprobs": {"content": [{"id": t, "logprob": lp} for t, lp in steps]}}],
                     "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(steps),
                               "total_tokens": len(prompt) + len(steps)}}
