"""A webhook receiver for the integration tests (tests/tests/integration/webhooks.rs).

It verifies every delivery with the official Standard Webhooks library for Python
(`standardwebhooks`, from PyPI): code written apart from the service's signer. Each
path is one receiver, set up by the test through POST /_control:

    {"path": "/a", "secrets": ["whsec_..."], "status": 200, "delay_ms": 0,
     "redirect": null}

Every request to a receiver path is answered with its status (after its delay; a 3xx
with `Location: <redirect>`) and recorded; GET /_deliveries?path=/a answers the records
in arrival order: webhook-id, timestamp, type, the body, and whether (and why not) the
library verified it. POST /_verify checks a delivery given as JSON (body and headers)
without recording it, so a test can try a tampered copy.

The port it listens on is printed on the first line of stdout.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

LOCK = threading.Lock()
RECEIVERS = {}
RECORDS = {}


def verify(secrets, body, headers):
    """(ok, error) of the library's verification with any of the secrets."""
    errors = []
    for secret in secrets:
        try:
            Webhook(secret).verify(body, headers)
            return True, None
        except WebhookVerificationError as e:
            errors.append(str(e))
        except Exception as e:  # a malformed header is an error of its own kind
            errors.append(f"{type(e).__name__}: {e}")
    return False, "; ".join(errors) or "no secret"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self, status, payload=None, headers=None):
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/_deliveries":
            path = parse_qs(url.query).get("path", ["/"])[0]
            with LOCK:
                records = list(RECORDS.get(path, []))
            return self._answer(200, records)
        self._answer(404, {"error": "no such path"})

    def do_POST(self):
        url = urlparse(self.path)
        body = self._body()
        if url.path == "/_control":
            c = json.loads(body)
            with LOCK:
                r = RECEIVERS.setdefault(c["path"], {})
                r.update({k: v for k, v in c.items() if k != "path"})
                RECORDS.setdefault(c["path"], [])
            return self._answer(200, {"ok": True})
        if url.path == "/_verify":
            c = json.loads(body)
            ok, error = verify(c["secrets"], c["body"].encode(), c["headers"])
            return self._answer(200, {"verified": ok, "error": error})
        with LOCK:
            r = dict(RECEIVERS.get(url.path, {}))
        if not r:
            return self._answer(404, {"error": "no receiver at this path"})
        headers = {k.lower(): v for k, v in self.headers.items()}
        ok, error = verify(r.get("secrets", []), body, headers)
        try:
            event_type = json.loads(body).get("type")
        except ValueError:
            event_type = None
        record = {
            "webhook_id": headers.get("webhook-id"),
            "timestamp": headers.get("webhook-timestamp"),
            "signature": headers.get("webhook-signature"),
            "type": event_type,
            "body": body.decode("utf-8", "replace"),
            "verified": ok,
            "error": error,
            "status": r.get("status", 200),
            "received_at": time.time(),
        }
        with LOCK:
            RECORDS.setdefault(url.path, []).append(record)
        delay = r.get("delay_ms", 0)
        if delay:
            time.sleep(delay / 1000)
        extra = {"Location": r["redirect"]} if r.get("redirect") else None
        self._answer(r.get("status", 200), {"verified": ok}, extra)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
