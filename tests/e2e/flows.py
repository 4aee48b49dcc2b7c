"""Client flows through synapse-edge in front of real Synapse workers, with
matrix-nio; then proof of which worker served what; then the route table
checked against the real workers.

Each flow is a named check; the run fails if any check fails.
"""

import argparse
import asyncio
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import aiohttp
from nio import (
    AsyncClient,
    JoinResponse,
    LoginResponse,
    MessageDirection,
    RegisterResponse,
    RoomCreateResponse,
    RoomMessagesResponse,
    RoomSendResponse,
    SyncResponse,
    UploadResponse,
)

SERVER = "e2e.test"
RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append((name, bool(ok), detail))
    mark = "PASS" if ok else "FAIL"
    print(f"  [{mark}] {name}" + (f": {detail}" if detail and not ok else ""), flush=True)
    return ok


def q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


class Raw:
    """Plain HTTP calls for endpoints matrix-nio has no method for."""

    def __init__(self, base: str, session: aiohttp.ClientSession):
        self.base = base
        self.session = session

    async def call(self, method, path, token=None, body=None, data=None, headers=None):
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        kwargs = {"headers": h}
        if body is not None:
            kwargs["json"] = body
        if data is not None:
            kwargs["data"] = data
        async with self.session.request(method, self.base + path, **kwargs) as r:
            return r.status, await r.read(), r.headers


async def register(base, name):
    c = AsyncClient(base, "")
    r = await c.register(name, "correct horse battery staple", device_name=f"{name}-dev")
    await c.close()
    return r


async def login(base, name):
    c = AsyncClient(base, f"@{name}:{SERVER}")
    r = await c.login("correct horse battery staple", device_name=f"{name}-login")
    return c, r


def synapse_args(run_dir):
    """The Synapse config as the edge reads it: homeserver.yaml, then the
    generated worker section and worker files."""
    return ["--synapse-config", str(run_dir / "homeserver.yaml"),
            "--synapse-config", str(run_dir / "gen" / "homeserver-workers.yaml"),
            "--synapse-config", str(run_dir / "gen" / "workers")]


def edge_route(edge_bin, run_dir, method, target):
    out = subprocess.run(
        [edge_bin, "route", "--json", *synapse_args(run_dir), method, target],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)


def timeline_bodies(sync: SyncResponse, room_id):
    room = sync.rooms.join.get(room_id)
    if not room:
        return []
    return [getattr(e, "body", None) for e in room.timeline.events]


async def flows(base, run_dir, edge_bin):
    ctx = {}
    raw = Raw(base, aiohttp.ClientSession())
    try:
        # Registration and login.
        ra = await register(base, "alice")
        rb = await register(base, "bob")
        check("register two users", isinstance(ra, RegisterResponse) and isinstance(rb, RegisterResponse), f"{ra} {rb}")
        alice, la = await login(base, "alice")
        bob, lb = await login(base, "bob")
        if not check("log in", isinstance(la, LoginResponse) and isinstance(lb, LoginResponse), f"{la} {lb}"):
            return ctx
        ctx.update(alice=alice, bob=bob)

        # Rooms: create until the edge has sent rooms to both room workers.
        rooms, seen = [], set()
        for i in range(24):
            r = await alice.room_create(name=f"room {i}", invite=[bob.user_id] if i == 0 else [])
            if not isinstance(r, RoomCreateResponse):
                check("create a room", False, str(r))
                return ctx
            rooms.append(r.room_id)
            seen.add(edge_route(edge_bin, run_dir, "GET", f"/_matrix/client/v3/rooms/{q(r.room_id)}/messages")["worker"])
            if {"rooms1", "rooms2"} <= seen and i >= 1:
                break
        check("create rooms", len(rooms) >= 2, f"rooms spread over {sorted(seen)}")
        room = rooms[0]
        ctx["room"] = room

        # Initial sync for both, then invite and join.
        s = await bob.sync(timeout=0, full_state=True)
        check("initial sync (bob)", isinstance(s, SyncResponse) and room in s.rooms.invite, str(s)[:200])
        j = await bob.join(room)
        check("invite and join", isinstance(j, JoinResponse), str(j))
        s = await alice.sync(timeout=0, full_state=True)
        check("initial sync (alice)", isinstance(s, SyncResponse) and room in s.rooms.join, str(s)[:200])

        # Messages both ways, seen in incremental syncs.
        sent = []
        for i in range(12):
            who = alice if i % 2 == 0 else bob
            r = await who.room_send(room, "m.room.message", {"msgtype": "m.text", "body": f"message {i}"})
            if isinstance(r, RoomSendResponse):
                sent.append(r.event_id)
        check("send messages", len(sent) == 12, f"{len(sent)} of 12 sent")
        ctx["event"] = sent[-1] if sent else None
        sa = await alice.sync(timeout=1000)
        sb = await bob.sync(timeout=1000)
        got_a = [b for b in timeline_bodies(sa, room) if b]
        got_b = [b for b in timeline_bodies(sb, room) if b]
        # Odd messages are bob's, even ones alice's.
        check("incremental sync: alice sees bob's messages", {"message 9", "message 11"} <= set(got_a), str(got_a))
        check("incremental sync: bob sees alice's messages", {"message 8", "message 10"} <= set(got_b), str(got_b))

        # Pagination over /messages (room-sticky).
        r1 = await alice.room_messages(room, start=sa.next_batch, limit=5, direction=MessageDirection.back)
        r2 = await alice.room_messages(room, start=r1.end, limit=5, direction=MessageDirection.back) if isinstance(r1, RoomMessagesResponse) else r1
        ok = isinstance(r2, RoomMessagesResponse) and len(r1.chunk) == 5 and len(r2.chunk) == 5
        check("/messages pagination", ok and r1.chunk[0].event_id != r2.chunk[0].event_id, str(r2)[:200])

        # Other rooms get traffic too, so both room workers serve.
        for other in rooms[1:]:
            await alice.room_send(other, "m.room.message", {"msgtype": "m.text", "body": "hello"})
            await alice.room_messages(other, start="", limit=2)

        # Typing, receipts, read markers, seen by the other user.
        t = await alice.room_typing(room, typing_state=True, timeout=10000)
        st, _, _ = await raw.call("POST", f"/_matrix/client/v3/rooms/{q(room)}/receipt/m.read/{q(sent[-1])}", bob.access_token, {})
        rm = await bob.room_read_markers(room, fully_read_event=sent[-1], read_event=sent[-1])
        sb = await bob.sync(timeout=1000)
        eph = [e.__class__.__name__ for e in sb.rooms.join[room].ephemeral] if room in sb.rooms.join else []
        check("typing", type(t).__name__ == "RoomTypingResponse" and "TypingNoticeEvent" in eph, f"{t} {eph}")
        check("read receipt", st == 200 and type(rm).__name__ == "RoomReadMarkersResponse", f"{st} {rm}")

        # Account data and room tags.
        st1, _, _ = await raw.call("PUT", f"/_matrix/client/v3/user/{q(alice.user_id)}/account_data/org.example.e2e", alice.access_token, {"k": "v"})
        st2, body, _ = await raw.call("GET", f"/_matrix/client/v3/user/{q(alice.user_id)}/account_data/org.example.e2e", alice.access_token)
        check("account data", st1 == 200 and st2 == 200 and json.loads(body) == {"k": "v"}, f"{st1} {st2} {body[:100]}")
        st1, _, _ = await raw.call("PUT", f"/_matrix/client/v3/user/{q(alice.user_id)}/rooms/{q(room)}/tags/u.work", alice.access_token, {"order": 0.5})
        st2, body, _ = await raw.call("GET", f"/_matrix/client/v3/user/{q(alice.user_id)}/rooms/{q(room)}/tags", alice.access_token)
        check("room tags", st1 == 200 and "u.work" in json.loads(body).get("tags", {}), f"{st1} {st2} {body[:100]}")

        # To-device message, received by bob's sync.
        st, _, _ = await raw.call(
            "PUT", "/_matrix/client/v3/sendToDevice/org.example.e2e/txn-1", alice.access_token,
            {"messages": {bob.user_id: {bob.device_id: {"hello": "bob"}}}},
        )
        sb = await bob.sync(timeout=2000)
        got = [e for e in sb.to_device_events if getattr(e, "source", {}).get("type") == "org.example.e2e"]
        check("to-device message", st == 200 and got, f"{st} {sb.to_device_events}")

        # Media: 5 MiB up and back byte-identical; a thumbnail of a small image.
        blob = os.urandom(5 << 20)
        up, _ = await alice.upload(io.BytesIO(blob), content_type="application/octet-stream", filename="blob.bin", filesize=len(blob))
        ok = isinstance(up, UploadResponse)
        if ok:
            server, media_id = up.content_uri[len("mxc://"):].split("/", 1)
            st, body, _ = await raw.call("GET", f"/_matrix/client/v1/media/download/{server}/{media_id}", alice.access_token)
            ok = st == 200 and hashlib.sha256(body).digest() == hashlib.sha256(blob).digest()
        check("upload 5 MiB and download it back byte-identical", ok, f"{up}")
        from PIL import Image

        png = io.BytesIO()
        Image.effect_noise((320, 240), 64).convert("RGB").save(png, format="PNG")
        up, _ = await alice.upload(io.BytesIO(png.getvalue()), content_type="image/png", filename="a.png", filesize=len(png.getvalue()))
        ok = isinstance(up, UploadResponse)
        if ok:
            server, media_id = up.content_uri[len("mxc://"):].split("/", 1)
            st, body, hdrs = await raw.call(
                "GET", f"/_matrix/client/v1/media/thumbnail/{server}/{media_id}?width=32&height=32&method=crop", alice.access_token
            )
            ok = st == 200 and hdrs.get("Content-Type", "").startswith("image/")
            ok = ok and Image.open(io.BytesIO(body)).size == (32, 32)
        check("thumbnail of a small image", ok, f"{up}")

        # Discovery and federation endpoints.
        st, body, _ = await raw.call("GET", "/_matrix/client/versions")
        check("/_matrix/client/versions", st == 200 and "versions" in json.loads(body), str(st))
        st, body, _ = await raw.call("GET", "/_matrix/federation/v1/version")
        check("/_matrix/federation/v1/version", st == 200 and json.loads(body)["server"]["name"] == "Synapse", str(body[:100]))
        st, body, _ = await raw.call("GET", "/_matrix/key/v2/server")
        check("/_matrix/key/v2/server", st == 200 and json.loads(body).get("server_name") == SERVER, str(body[:100]))
    finally:
        await raw.session.close()
    return ctx


SERVED = re.compile(r'^synapse_http_server_requests_received_total\{([^}]*)\} ([0-9.e+]+)$', re.M)


def metrics_ports(run_dir):
    """Each process's metrics port, from its (generated) config."""
    ports = {"main": int(re.search(r"type: metrics\s+bind_address: '[^']*'\s+port: (\d+)",
                                   (run_dir / "homeserver.yaml").read_text()).group(1))}
    for f in (run_dir / "gen" / "workers").glob("*.yaml"):
        m = re.search(r"type: metrics\s+bind_address: '[^']*'\s+port: (\d+)", f.read_text())
        if m:
            ports[f.stem] = int(m.group(1))
    return ports


async def served_by(run_dir):
    """Requests each process received, by servlet, from its own metrics."""
    out = {}
    async with aiohttp.ClientSession() as s:
        for worker, port in metrics_ports(run_dir).items():
            async with s.get(f"http://127.0.0.1:{port}/_synapse/metrics") as r:
                text = await r.text()
            counts = {}
            for labels, value in SERVED.findall(text):
                servlet = re.search(r'servlet="([^"]*)"', labels).group(1)
                counts[servlet] = counts.get(servlet, 0) + float(value)
            out[worker] = counts
    return out


async def proof_of_routing(run_dir):
    served = await served_by(run_dir)
    def n(worker, servlets):
        return sum(served.get(worker, {}).get(s, 0) for s in servlets)
    room = ["RoomSendEventRestServlet", "RoomMessageListRestServlet"]
    check("rooms1 served room traffic", n("rooms1", room) > 0, str(served.get("rooms1")))
    check("rooms2 served room traffic", n("rooms2", room) > 0, str(served.get("rooms2")))
    check("client_sync1 served /sync", n("client_sync1", ["SyncRestServlet"]) > 0, str(served.get("client_sync1")))
    streams = [("typing", ["RoomTypingRestServlet"]), ("receipts", ["ReceiptRestServlet"]),
               ("read markers", ["ReadMarkerRestServlet"]), ("to-device", ["SendToDeviceRestServlet"]),
               ("account data", ["AccountDataServlet", "RoomAccountDataServlet"]), ("tags", ["TagServlet", "TagListServlet"])]
    for what, servlets in streams:
        check(f"client_sync1 served {what}", n("client_sync1", servlets) > 0)
        others = {w: n(w, servlets) for w in served if w != "client_sync1" and n(w, servlets)}
        check(f"no non-writer served {what}", not others, str(others))
    media = ["UploadServlet", "DownloadResource", "ThumbnailResource"]
    check("media1 served media", n("media1", media) > 0, str(served.get("media1")))
    others = {w: n(w, media) for w in served if w != "media1" and n(w, media)}
    check("no other worker served media", not others, str(others))


# Values for path parameters when checking routes against real workers.
def examples(ctx, alice):
    return {
        "{room}": q(ctx["room"]), "{user}": q(alice.user_id), "{event}": q(ctx["event"]),
        "{thread}": q(ctx["event"]), "{event_type}": "org.example.check", "{data_type}": "org.example.check",
        "{txn}": f"check-{time.time_ns()}", "{tag}": "u.check", "{receipt_type}": "m.read",
        "{alias}": q(f"#nowhere:{SERVER}"), "{idp}": "oidc", "{delay_id}": "nodelay",
    }


# `{*rest}` values, by what precedes it.
REST = [
    ("/presence/", "{user}/status"), ("/pushrules/", "global/override/.m.rule.master"),
    ("/devices/", "NODEVICE"), ("/keys/upload/", "NODEVICE"), ("/relations/", "{event}"),
    ("/state/", "m.room.name"), ("/room_keys/", "version"), ("/filter/", "1"),
    ("/profile/{user}/", "displayname"), ("/quarantine_media/", "{room}"),
    ("/federation/v1/send/", "txn1"), ("/federation/v1/event/", "{event}"), ("/federation/v1/query/", "profile"),
    ("/user/devices/", "{user}"), ("/key/v2/query/", SERVER), ("/_matrix/media/", "v3/config"),
    ("/_matrix/client/v1/media/", "config"), ("/_matrix/federation/v1/media/", "download/nomedia"),
    ("/media/", "quarantine"), ("/_synapse/admin/v1/media/", f"{SERVER}/nomedia"), ("/pick_username/", "account_details"),
]


def concrete(path, values):
    if "{*rest}" in path:
        prefix = path.split("{*rest}")[0]
        matches = [(len(k), v) for k, v in REST if prefix.endswith(k)]
        rest = max(matches)[1] if matches else "x"
        path = prefix + rest
    for k, v in values.items():
        path = path.replace(k, v)
    return path


async def verify_routes(run_dir, edge_bin, ctx):
    out = subprocess.run(
        [edge_bin, "check", "--json", *synapse_args(run_dir)],
        capture_output=True, text=True, check=True,
    )
    table = json.loads(out.stdout)["routes_table"]
    alice = ctx["alice"]
    values = examples(ctx, alice)
    rows, failures = [], 0
    sessions = {}
    for r in table:
        if r["name"] == "main_fallback":
            continue
        if r["name"] == "sso":
            rows.append((r["name"], "(all SSO paths)", "-", "main", "-", "skipped: SSO is not configured"))
            continue
        worker = r["members"][0]
        # A route whose pools are empty here falls back to main; check it
        # on a generic worker, which the route claims can serve it.
        if r["pool_name"] == "main" and "main" not in r["pool_chain"] and not r["pool_chain"][0].startswith("stream:"):
            worker = "rooms1"
        sock = run_dir / "sockets" / f"synapse_inbound_{worker}.sock"
        if sock not in sessions:
            sessions[sock] = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)))
        method = (r["methods"] or ["GET"])[0]
        for path in r["paths"]:
            # timeout=0: long-poll endpoints answer at once.
            target = concrete(path, values) + "?timeout=0"
            async with sessions[sock].request(method, "http://localhost" + target,
                                              headers={"Authorization": f"Bearer {alice.access_token}"}) as resp:
                body = await resp.read()
            try:
                errcode = json.loads(body).get("errcode", "")
            except Exception:
                errcode = ""
            unrecognised = resp.status == 404 and errcode == "M_UNRECOGNIZED"
            failures += unrecognised
            rows.append((r["name"], target[:90], method, worker, f"{resp.status} {errcode}",
                         "UNRECOGNISED" if unrecognised else "ok"))
    for s in sessions.values():
        await s.close()
    print("\n  route table against real workers (sent straight to each route's worker):")
    print(f"  {'route':22} {'method':6} {'worker':18} {'answer':22} verdict  target")
    for name, target, method, worker, answer, verdict in rows:
        print(f"  {name:22} {method:6} {worker:18} {answer:22} {verdict:8} {target}")
    check(f"route table: every path recognised by its worker ({len(rows)} checked)", failures == 0,
          f"{failures} paths unrecognised")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--edge", required=True)
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--edge-bin", required=True)
    a = ap.parse_args()
    t0 = time.monotonic()
    print("client flows through synapse-edge:")
    ctx = await flows(a.edge, a.run_dir, a.edge_bin)
    print("proof of routing (from each worker's own metrics):")
    await proof_of_routing(a.run_dir)
    if "alice" in ctx and ctx.get("event"):
        await verify_routes(a.run_dir, a.edge_bin, ctx)
    for c in ("alice", "bob"):
        if c in ctx:
            await ctx[c].close()
    failed = [n for n, ok, _ in RESULTS if not ok]
    print(f"\nchecks took {time.monotonic() - t0:.0f} s")
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
