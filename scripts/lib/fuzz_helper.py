"""Helpers of scripts/fuzz (standard library only; run with any Python >= 3.9).

    fuzz_helper.py seed URL
        Seed a fresh `crm serve` through its public API, as a client would: log the
        first owner in, switch the portal module on, create contacts, two custom roles,
        users, an API key and portal access, sign two contacts in to the portal (the
        magic link is read from the mail spool) and sign in the users whose tokens the
        session-ending operations get (logout, password change, 2FA), and the owners
        of two more organisations (organisation-wide settings: modules, required 2FA).
        Logins come from the environment (not argv, which `ps` shows): CRM_FUZZ_OWNER,
        CRM_FUZZ_ORG2_OWNER, CRM_FUZZ_ORG3_OWNER as `email password`; the mail spool is
        CRM_MAIL_SPOOL_DIR. Prints `export NAME=value` lines for scripts/fuzz;
        diagnostics go to stderr.

    fuzz_helper.py delete-stream NATS_URL STREAM
        Delete a JetStream stream (the run's own), speaking the NATS text protocol.

    fuzz_helper.py summary JUNIT_XML
        Print the failures of a schemathesis JUnit report grouped by operation and check.

Exit status 1 on any unexpected answer.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request

PASSWORD = "fuzz-seed-password-1"  # for the users this script creates (>= 12 chars)


def log(msg: str) -> None:
    print(f"[crm] {msg}", file=sys.stderr)


class Api:
    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def call(self, method: str, path: str, body=None, token: str | None = None, expect=(200, 201, 202)):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("content-type", "application/json")
        if token:
            req.add_header("authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        if status not in expect:
            sys.exit(f"[crm] seed: {method} {path} answered {status}: {raw[:500]!r}")
        return json.loads(raw) if raw else None


def wait_for_mail(spool: str, to: str, seen: set[str], timeout: float = 30.0) -> str:
    """The link token of the first new spooled mail to `to` (the service writes it in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in sorted(os.listdir(spool)) if os.path.isdir(spool) else []:
            if not name.endswith(".eml") or name in seen:
                continue
            with open(os.path.join(spool, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
            if to.lower() not in text.lower():
                continue
            seen.add(name)
            m = re.search(r"#token=([A-Za-z0-9_\-]+)", text)
            if m:
                return m.group(1)
        time.sleep(0.2)
    sys.exit(f"[crm] seed: no mail to {to} in {spool} within {timeout:.0f}s")


def _login_from_env(name: str) -> tuple[str, str]:
    value = os.environ.get(name, "")
    email, _, password = value.partition(" ")
    if not email or not password:
        sys.exit(f"[crm] seed: {name} must be `email password`")
    return email, password


def seed(url: str) -> int:
    owner_email, owner_password = _login_from_env("CRM_FUZZ_OWNER")
    spool = os.environ.get("CRM_MAIL_SPOOL_DIR") or sys.exit("[crm] seed: CRM_MAIL_SPOOL_DIR is not set")
    api = Api(url)
    out: dict[str, str] = {}

    def login(email: str, password: str) -> str:
        return api.call("POST", "/v1/auth/login", {"email": email, "password": password})["access_token"]

    owner = login(owner_email, owner_password)
    out["CRM_FUZZ_TOKEN"] = owner
    me = api.call("GET", "/v1/me", token=owner)
    org_id = me.get("org_id") or ""
    if not org_id:
        sys.exit(f"[crm] seed: no org id in GET /v1/me: {me!r}")
    out["CRM_FUZZ_ORG_ID"] = org_id

    api.call(
        "PUT",
        "/v1/organization/modules",
        {"modules": ["contacts", "activity", "reports", "portal"]},
        token=owner,
    )

    # Contacts: one per kind of operation, so that archiving one or revoking another's
    # portal access does not turn the others' answers into 409s.
    contacts = {}
    last_position = 0
    for key in ("READ", "ARCHIVE", "GRANT", "REVOKE", "PORTAL", "PORTAL_LOGOUT", "SPARE1", "SPARE2"):
        email = f"fuzz.{key.lower().replace('_', '.')}@example.com"
        created = api.call(
            "POST",
            "/v1/contacts",
            {
                "given_name": "Fuzz",
                "family_name": key.title(),
                "email": email,
                "phone": "+441632960961",
                "company": "Fuzz Ltd",
                "address": {"line1": "1 Test Street", "city": "London", "country": "GB"},
                "custom": {"tier": "gold", "score": 3, "vip": True},
            },
            token=owner,
        )
        contacts[key] = (created["id"], email)
        last_position = max([last_position, *created.get("positions", [])])
        out[f"CRM_FUZZ_CONTACT_{key}"] = created["id"]
    # Some history on the read contact.
    cid = contacts["READ"][0]
    upd = api.call("PATCH", f"/v1/contacts/{cid}", {"company": "Fuzz Holdings", "title": "CTO"}, token=owner)
    last_position = max([last_position, *upd.get("positions", [])])
    # Read your writes: wait until the contacts read model has all of them.
    api.call("GET", f"/v1/contacts/{cid}?min_position={last_position}&wait_ms=5000", token=owner)

    # Roles: one to change, one to retire.
    for key in ("ROLE", "ROLE_RETIRE"):
        role = api.call(
            "POST",
            "/v1/roles",
            {
                "name": f"Fuzz {key.lower()}",
                "permissions": ["contacts.read", "contacts.update", "activity.read"],
                "fields": {"email": "read", "phone": "hidden"},
            },
            token=owner,
        )
        out[f"CRM_FUZZ_{key}_ID"] = role["id"]

    # A user the users.* operations act on (never the owner, nor a user whose token is used).
    user = api.call(
        "POST",
        "/v1/users",
        {"email": "fuzz.target@example.com", "display_name": "Fuzz Target", "role": "team", "password": PASSWORD},
        token=owner,
    )
    out["CRM_FUZZ_USER_ID"] = user["id"]
    # One with the custom role, so that the role is in use.
    api.call(
        "POST",
        "/v1/users",
        {
            "email": "fuzz.custom@example.com",
            "display_name": "Fuzz Custom",
            "role": out["CRM_FUZZ_ROLE_ID"],
            "password": PASSWORD,
        },
        token=owner,
    )

    key = api.call("POST", "/v1/api-keys", {"name": "fuzz key", "role": "viewer"}, token=owner)
    out["CRM_FUZZ_API_KEY_ID"] = key["id"]

    # AI provider credentials (docs/vault.md): one to read, rotate and verify, one to
    # delete. Their provider is the discard port of this host: verification is refused
    # at once (ok: false, unreachable), nothing leaves the machine.
    for name in ("ID", "DELETE"):
        credential = api.call(
            "POST",
            "/v1/ai/credentials",
            {"provider": "other", "label": f"Fuzz {name.lower()}", "secret": "sk-fuzz-0123456789",
             "base_url": "http://127.0.0.1:9/v1"},
            token=owner,
        )
        out[f"CRM_FUZZ_CREDENTIAL_{name}"] = credential["id"]

    # Webhook endpoints (docs/webhooks.md): one to read, change, rotate, disable, enable,
    # replay and list messages of, one to delete. Their host is under .invalid (RFC
    # 6761): it never resolves, so every attempt fails at once and nothing leaves the
    # machine.
    for name in ("ID", "DELETE"):
        hook = api.call(
            "POST",
            "/v1/webhooks",
            {"url": f"https://hooks.invalid/fuzz/{name.lower()}", "event_types": ["contact.created"],
             "role": "admin", "description": f"Fuzz {name.lower()}"},
            token=owner,
        )
        out[f"CRM_FUZZ_WEBHOOK_{name}"] = hook["id"]

    # Users whose sessions the session-ending operations may end.
    for name in ("LOGOUT", "PASSWORD", "2FA"):
        email = f"fuzz.session.{name.lower()}@example.com"
        api.call(
            "POST",
            "/v1/users",
            {"email": email, "display_name": f"Fuzz {name}", "role": "admin", "password": PASSWORD},
            token=owner,
        )
        out[f"CRM_FUZZ_TOKEN_{name}"] = login(email, PASSWORD)

    # Portal access, and portal tokens through a magic link.
    # (GRANT stays without access: the grant operation gives it.)
    for k in ("REVOKE", "PORTAL", "PORTAL_LOGOUT"):
        api.call("POST", f"/v1/contacts/{contacts[k][0]}/portal-access", {}, token=owner)
    seen: set[str] = set()
    for k in ("PORTAL", "PORTAL_LOGOUT"):
        email = contacts[k][1]
        api.call("POST", "/portal/auth/magic-link", {"org_id": org_id, "email": email})
        token = wait_for_mail(spool, email, seen)
        redeemed = api.call("POST", "/portal/auth/magic-link/redeem", {"token": token})
        out["CRM_FUZZ_PORTAL_TOKEN" if k == "PORTAL" else "CRM_FUZZ_PORTAL_TOKEN_LOGOUT"] = redeemed["access_token"]

    # Owners of two more organisations: organisation-wide settings, one each (once 2FA
    # is required, an Owner without it can change nothing else).
    out["CRM_FUZZ_TOKEN_ORG2"] = login(*_login_from_env("CRM_FUZZ_ORG2_OWNER"))
    out["CRM_FUZZ_TOKEN_ORG3"] = login(*_login_from_env("CRM_FUZZ_ORG3_OWNER"))

    for k, v in out.items():
        if not re.fullmatch(r"[A-Za-z0-9._~+/=-]+", v):
            sys.exit(f"[crm] seed: unexpected characters in {k}")
        print(f"export {k}={v}")
    log(f"seeded {len(contacts)} contacts, 2 roles, 5 users, 1 API key, 2 AI credentials, 2 webhook endpoints, portal access for 3 contacts")
    return 0



def delete_stream(nats_url: str, stream: str) -> int:
    import socket
    from urllib.parse import urlparse

    u = urlparse(nats_url)
    with socket.create_connection((u.hostname or "127.0.0.1", u.port or 4222), timeout=10) as sock:
        f = sock.makefile("rwb")
        info = f.readline()
        if not info.startswith(b"INFO "):
            sys.exit(f"[crm] NATS: unexpected greeting {info[:80]!r}")
        inbox = "_INBOX.crmfuzz.delete"
        f.write(b'CONNECT {"verbose":false,"pedantic":false,"lang":"python","version":"0"}\r\n')
        f.write(f"SUB {inbox} 1\r\n".encode())
        f.write(f"PUB $JS.API.STREAM.DELETE.{stream} {inbox} 0\r\n\r\n".encode())
        f.flush()
        while True:
            line = f.readline()
            if not line:
                sys.exit("[crm] NATS: connection closed before the answer")
            if line.startswith(b"PING"):
                f.write(b"PONG\r\n")
                f.flush()
            elif line.startswith(b"-ERR"):
                sys.exit(f"[crm] NATS: {line.decode(errors='replace').strip()}")
            elif line.startswith(b"MSG "):
                size = int(line.split()[-1])
                payload = f.read(size + 2)[:size]
                answer = json.loads(payload or b"{}")
                if answer.get("success"):
                    log(f"deleted JetStream stream {stream}")
                    return 0
                err = answer.get("error", {})
                if err.get("err_code") == 10059:  # stream not found: nothing to delete
                    log(f"JetStream stream {stream} not found (nothing to delete)")
                    return 0
                sys.exit(f"[crm] NATS: stream {stream} not deleted: {err}")


def summary(junit_path: str) -> int:
    """Failures of a schemathesis JUnit report, grouped: operation, then check (count)."""
    import xml.etree.ElementTree as ET

    root = ET.parse(junit_path).getroot()
    groups: dict[str, dict[str, int]] = {}
    errors: dict[str, list[str]] = {}
    for case in root.iter("testcase"):
        name = case.get("name") or "?"
        for kind in ("failure", "error"):
            for node in case.findall(kind):
                text = (node.get("message") or "") + "\n" + (node.text or "")
                if kind == "error":
                    errors.setdefault(name, []).append(text.strip().splitlines()[0] if text.strip() else "error")
                    continue
                # One <failure> per operation: numbered test cases ("1. Test Case ID: …"),
                # each listing the checks it failed as "- ST103 Undocumented status code".
                titles = re.findall(r"^- (ST\d+ .+?)\s*$", text, flags=re.M) or [text.strip().splitlines()[0]]
                for t in titles:
                    groups.setdefault(name, {}).setdefault(t, 0)
                    groups[name][t] += 1
    if not groups and not errors:
        print("no failures")
        return 0
    for name in sorted(groups):
        print(name)
        for title, n in sorted(groups[name].items()):
            print(f"    {title}" + (f"  (x{n})" if n > 1 else ""))
    for name in sorted(errors):
        print(f"{name}  [error]")
        for e in sorted(set(errors[name])):
            print(f"    {e}")
    return 0


def main(argv: list[str]) -> int:
    commands = {"seed": (seed, 1), "delete-stream": (delete_stream, 2), "summary": (summary, 1)}
    if len(argv) < 2 or argv[1] not in commands or len(argv) - 2 != commands[argv[1]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    func, _ = commands[argv[1]]
    return func(*argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
