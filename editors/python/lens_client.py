#!/usr/bin/env python3
"""A minimal client for the logit-lens daemon (`logit-lens serve --listen ADDR`).

Standard library only (socket, json). Messages use the LSP base-protocol framing:
``Content-Length: N\\r\\n\\r\\n<json>``. See docs/protocol.md.

    from lens_client import LensClient
    with LensClient("127.0.0.1", 7420) as c:
        report = c.analyze("The capital of France is", top_k=3)
        print(report["positions"][-1]["final_top1"]["text"])

Generation streams: each new token arrives with every layer's top-1 at that step.

    with LensClient("127.0.0.1", 7420) as c:
        for step in c.generate("The capital of France is", max_tokens=8):
            print(step["text"], step["first_top1_layer"])

Leaving the loop early cancels the generation on the daemon.

As a command:  python3 lens_client.py HOST:PORT analyze|position|tokenize|modelInfo|cacheStats [TEXT] [POSITION]
               python3 lens_client.py HOST:PORT generate TEXT [MAX_TOKENS]   (one JSON line per token, then the result)
"""

import json
import socket
import sys


class LensError(Exception):
    """A JSON-RPC error answered by the server: .code, .message, .kind (data.kind)."""

    def __init__(self, error):
        self.code = error.get("code")
        self.message = error.get("message")
        self.kind = (error.get("data") or {}).get("kind")
        super().__init__(f"{self.message} ({self.code}{', ' + self.kind if self.kind else ''})")


class LensClient:
    def __init__(self, host="127.0.0.1", port=7420, token=None, timeout=300.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.token = token
        self.next_id = 1

    def close(self):
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, message):
        body = json.dumps(message, ensure_ascii=False).encode("utf-8")
        self.sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def receive(self):
        length = None
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("the server closed the connection")
            line = line.strip()
            if not line:
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if length is None:
            raise ConnectionError("a message without Content-Length")
        return json.loads(self.file.read(length).decode("utf-8"))

    def request(self, method, params=None):
        params = dict(params or {})
        if self.token is not None:
            params["token"] = self.token
        rid = self.next_id
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        while True:
            msg = self.receive()
            if msg.get("id") == rid:
                if "error" in msg:
                    raise LensError(msg["error"])
                return msg["result"]

    def generate(self, text, max_tokens=32, temperature=0.0, top_p=1.0, seed=0, chat=False, layers=None):
        """Yield each generated token's step (`lens/generateStep`) as it arrives; the
        generator's return value (``result = yield from c.generate(...)``) is the final
        answer. Closing the generator early (``break``) cancels the request."""
        params = {"text": text, "maxTokens": max_tokens, "temperature": temperature,
                  "topP": top_p, "seed": seed, "chat": chat}
        if layers is not None:
            params["layers"] = layers
        if self.token is not None:
            params["token"] = self.token
        rid = self.next_id
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": rid, "method": "lens/generate", "params": params})
        done = False
        try:
            while True:
                msg = self.receive()
                if msg.get("method") == "lens/generateStep" and msg["params"].get("id") == rid:
                    step = dict(msg["params"])
                    del step["id"]
                    yield step
                elif msg.get("id") == rid:
                    done = True
                    if "error" in msg:
                        raise LensError(msg["error"])
                    return msg["result"]
        finally:
            if not done:
                # Stopped early: cancel, then read up to the request's answer so that the
                # connection carries no stale messages.
                self.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": rid}})
                while self.receive().get("id") != rid:
                    pass

    def analyze(self, text, layers=None, positions=None, top_k=None, lens=None):
        params = {"text": text}
        for key, value in (("layers", layers), ("positions", positions), ("topK", top_k), ("lens", lens)):
            if value is not None:
                params[key] = value
        return self.request("lens/analyze", params)

    def position(self, text, position, layers=None, top_k=None, lens=None):
        params = {"text": text, "position": position}
        for key, value in (("layers", layers), ("topK", top_k), ("lens", lens)):
            if value is not None:
                params[key] = value
        return self.request("lens/position", params)

    def tokenize(self, text):
        return self.request("lens/tokenize", {"text": text})["tokens"]

    def model_info(self):
        return self.request("lens/modelInfo", {})

    def cache_stats(self):
        return self.request("lens/cacheStats", {})


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    host, _, port = argv[1].rpartition(":")
    command, rest = argv[2], argv[3:]
    with LensClient(host or "127.0.0.1", int(port)) as c:
        if command == "analyze":
            result = c.analyze(rest[0])
        elif command == "position":
            result = c.position(rest[0], int(rest[1]) if len(rest) > 1 else -1)
        elif command == "tokenize":
            result = c.tokenize(rest[0])
        elif command == "generate":
            steps = c.generate(rest[0], max_tokens=int(rest[1]) if len(rest) > 1 else 32)
            while True:
                try:
                    print(json.dumps(next(steps), ensure_ascii=False), flush=True)
                except StopIteration as end:
                    result = end.value
                    break
        elif command == "modelInfo":
            result = c.model_info()
        elif command == "cacheStats":
            result = c.cache_stats()
        else:
            print(f"unknown command {command}", file=sys.stderr)
            return 2
    json.dump(result, sys.stdout, ensure_ascii=False)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
