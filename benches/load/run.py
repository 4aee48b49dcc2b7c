#!/usr/bin/env python3
"""Load benchmark: synapse-edge against Nginx on the same stand-in workers.

Workers are an Nginx instance answering a small JSON body with an X-Worker
header on each worker's Unix socket (and on TCP, for the no-proxy
baseline). Both proxies get the same topology, keep-alive to the workers
and the same room and user hashing. wrk (on core 0) drives a Synapse-like
mix; proxies and workers share core 1. Runs alternate A B A B.

Prints a table with the ratios and writes results/latest.{json,md} and
results/chart.png beside this file.
"""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# The edge under test: run.sh sets the PGO build (scripts/build-pgo.sh), the
# binary the Docker image ships; `cargo build --release` without it.
EDGE = Path(os.environ.get("BENCH_EDGE", ROOT / "target" / "release" / "synapse-edge"))
# Another build of the edge to compare in the same rounds (an A/B of a
# change; run.sh: the plain `cargo build --release`): its short-request runs
# are reported as "edge-b".
EDGE_B = os.environ.get("BENCH_EDGE_B")
# What each build is, for the report's header.
BUILDS = {"edge": os.environ.get("BENCH_EDGE_NAME", str(EDGE)), "edge-b": os.environ.get("BENCH_EDGE_B_NAME", EDGE_B)}
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
CONNS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
PARKED = int(os.environ.get("BENCH_PARKED", "2000"))
# Synapse's answers are mostly larger than the stand-ins' 28 bytes; this pads
# every stand-in answer to about that many bytes (0: the small answer).
ANSWER_BYTES = int(os.environ.get("BENCH_ANSWER_BYTES", "0"))
# A subset for quick A/Bs while working, e.g. BENCH_SCENARIOS=http,longpoll
SCENARIOS = os.environ.get("BENCH_SCENARIOS", "http,https,h2,logged,upload,longpoll").split(",")
# A folder: each proxy's short-request runs are sampled with perf (call
# stacks by DWARF unwinding) and drawn as flame graphs there. perf takes
# CPU of its own, so such a run's figures are not comparable: results/ is
# left alone. benches/load/profile.sh sets it.
PROFILE = os.environ.get("BENCH_PROFILE")
ROUTED = ["main", "client_sync1", "rooms1", "rooms2", "rooms3", "rooms4", "federation_reader1", "media1"]
PORT = {"direct": 18100, "nginx": 18101, "nginx-tls": 18102, "edge": 18103, "edge-tls": 18104, "edge-b": 18105,
        "edge-b-tls": 18106, "stub": 18109, "nginx-logged": 18110, "nginx-buffered": 18111, "edge-logged": 18112,
        "edge-logged-tls": 18113, "direct-upload": 18114}

# Nginx against itself (round 1 / round 2) beyond this: the run is flagged
# as disturbed.
AA_LIMIT = 0.05

procs = []
WORKER_PIDS = []  # the stand-in workers' Nginx processes


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, capture_output=True, text=True, **kw)


def start(cmd, log, **kw):
    p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, **kw)
    procs.append(p)
    return p


def wait_port(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def wait_answers(port, timeout=20):
    """Until the proxy answers 200 for a request to each kind of worker."""
    paths = ["/_matrix/client/v3/rooms/%21a%3Ab/messages", "/_matrix/client/versions",
             "/_matrix/client/v1/media/download/a/b", "/_matrix/client/v3/sync?since=x&access_token=syt_cGFyaw_x_y"]
    end = time.time() + timeout
    while time.time() < end:
        ok = 0
        for p in paths:
            try:
                with socket.create_connection(("127.0.0.1", port), 1) as s:
                    s.sendall(f"GET {p} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                    ok += s.recv(64).startswith(b"HTTP/1.1 200")
            except OSError:
                pass
        if ok == len(paths):
            return
        time.sleep(0.2)
    raise SystemExit(f"the proxy on {port} does not answer 200")


def children(pid):
    out = [pid]
    try:
        for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += children(int(c))
    except OSError:
        pass
    return out


def cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / tick


def status_kib(pids, field):
    total = 0
    for p in pids:
        try:
            m = re.search(rf"^{field}:\s+(\d+)", Path(f"/proc/{p}/status").read_text(), re.M)
            total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


def core_busy_seconds(cpu=1):
    """Busy time of one core (user, nice, system, irq, softirq): the proxy,
    the workers and whatever the kernel did there, the figure that bounds
    throughput when they share the core."""
    for line in Path("/proc/stat").read_text().splitlines():
        f = line.split()
        if f[0] == f"cpu{cpu}":
            return sum(int(x) for x in (f[1], f[2], f[3], f[6], f[7])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def switches(pids):
    """Context switches of these processes so far: all of them (voluntary
    and involuntary), and those where a process was preempted."""
    total = preempted = 0
    for p in pids:
        for t in Path(f"/proc/{p}/task").glob("*"):
            try:
                text = (t / "status").read_text()
            except OSError:
                continue
            for kind, n in re.findall(r"^(non)?voluntary_ctxt_switches:\s+(\d+)", text, re.M):
                total += int(n)
                preempted += int(n) if kind else 0
    return total, preempted


def reset_peak(pids):
    for p in pids:
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            pass


def accepts():
    """Connections the workers accepted so far (Nginx stub_status)."""
    with socket.create_connection(("127.0.0.1", PORT["stub"])) as s:
        s.sendall(b"GET /stub HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    # "server accepts handled requests\n N N N\n"
    return int(re.findall(rb"\n\s*(\d+) \d+ \d+", data)[0])


def worker_nginx(run, without=()):
    """The stand-in workers' Nginx, for every routed worker but `without`."""
    servers = []

    def body(w):
        small = f'{{"worker":"{w}"}}'
        if ANSWER_BYTES <= len(small):
            return small
        return f'{{"worker":"{w}","pad":"' + "x" * max(0, ANSWER_BYTES - len(small) - 9) + '"}'

    for w in ROUTED:
        if w in without:
            continue
        servers.append(f"""  server {{ listen unix:{run}/sockets/synapse_inbound_{w}.sock; client_max_body_size 100m;
    location = /health {{ return 200 "OK"; }}
    location / {{ add_header X-Worker {w}; default_type application/json; return 200 '{body(w)}'; }} }}""")
    servers.append(f"""  server {{ listen 127.0.0.1:{PORT['direct']} reuseport; client_max_body_size 100m;
    location / {{ add_header X-Worker direct; default_type application/json; return 200 '{body("direct")}'; }} }}""")
    servers.append(f"""  server {{ listen 127.0.0.1:{PORT['stub']}; location /stub {{ stub_status; }} }}""")
    conf = f"""user root; worker_processes 1; daemon off; pid {run}/workers.pid; error_log {run}/workers-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{ access_log off; keepalive_requests 100000; client_body_temp_path {run}/wtmp;
{chr(10).join(servers)}
}}
"""
    (run / "workers.conf").write_text(conf)
    return run / "workers.conf"


def proxy_nginx(run):
    """Nginx configured like the edge: same pools, keep-alive, hashing."""
    sock = lambda w: f"server unix:{run}/sockets/synapse_inbound_{w}.sock max_fails=0;"
    locations = """    location ~ ^/_matrix/client/(r0|v3)/rooms/[^/]+/ { proxy_pass http://rooms; }
    location ~ ^/_matrix/client/(r0|v3)/sync$ { proxy_pass http://sync; }
    location ~ ^/_matrix/(media|client/v1/media)/ { proxy_pass http://media; }
    location / { proxy_pass http://main; }"""
    conf = f"""user root; worker_processes 1; daemon off; pid {run}/proxy.pid; error_log {run}/proxy-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {run}/ptmp;
  keepalive_requests 100000;
  client_max_body_size 100m;
  map $request_uri $room {{ "~^/_matrix/client/(?:r0|v3)/rooms/(?<r>[^/?]+)/" $r; default ""; }}
  map $arg_access_token $user {{ "~^syt_(?<u>[^_]+)_" $u; default $arg_access_token; }}
  upstream rooms {{ hash $room consistent; {sock('rooms1')} {sock('rooms2')} {sock('rooms3')} {sock('rooms4')} keepalive 128; }}
  upstream sync {{ hash $user consistent; {sock('client_sync1')} keepalive 128; }}
  upstream media {{ {sock('media1')} keepalive 128; }}
  upstream main {{ {sock('main')} keepalive 128; }}
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_set_header Host $host;
  proxy_set_header X-Forwarded-For $remote_addr;
  proxy_set_header X-Forwarded-Proto $scheme;
  proxy_read_timeout 300s;
  server {{
    listen 127.0.0.1:{PORT['nginx']};
    listen 127.0.0.1:{PORT['nginx-tls']} ssl http2;
    ssl_certificate {run}/cert.pem; ssl_certificate_key {run}/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
{locations}
  }}
  # The same with access logs, as each proxy writes them by default: a line
  # per request to a file (the "logged" scenario); and buffered, as a tuned
  # Nginx writes them (the edge's are always written in batches).
  server {{
    listen 127.0.0.1:{PORT['nginx-logged']};
    access_log {run}/nginx-access.log combined;
{locations}
  }}
  server {{
    listen 127.0.0.1:{PORT['nginx-buffered']};
    access_log {run}/nginx-access-buffered.log combined buffer=32k flush=100ms;
{locations}
  }}
}}
"""
    (run / "proxy.conf").write_text(conf)
    return run / "proxy.conf"


def wrk(port, tls=False, seconds=SECONDS, conns=CONNS):
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    out = sh(["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(HERE / "mix.lua"), url]).stdout
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    r = json.loads(line)
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


def h2_mix_targets():
    """The mix's GETs as h2load targets (it sends one method): the same
    rotation of rooms and users' tokens as mix.lua, without the PUTs."""
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def user(n):
        s, v = "", n + 4096
        while v > 0:
            s, v = s + b64[v % 64], v // 64
        return s

    out = []
    for c in range(1, 2001):
        k, room = c % 10, f"%21room{(c * 7919) % 2000}%3Abench.example"
        if k < 5:
            out.append(f"/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=10")
        elif k < 8:
            out.append(f"/_matrix/client/v3/sync?since=s{c}_1&timeout=0&access_token=syt_{user(c % 500)}_aBcDeFgHiJkLmNoPqRsT_1a2b3c")
        elif k < 9:
            out.append(f"/_matrix/client/v1/media/download/bench.example/m{c % 100}")
        else:
            out.append("/_matrix/client/versions")
    return out


def h2load(port, tls=True, seconds=SECONDS, conns=CONNS):
    """HTTP/2 over TLS, as browsers and mobile apps speak to a homeserver:
    one stream at a time per connection, like wrk's HTTP/1.1."""
    with tempfile.TemporaryDirectory() as d:
        targets, log = Path(d) / "targets", Path(d) / "log"
        targets.write_text("".join(f"https://127.0.0.1:{port}{t}\n" for t in h2_mix_targets()))
        out = sh(["taskset", "-c", "0", "h2load", "-t1", f"-c{conns}", "-m1", "-D", str(seconds),
                  "--log-file", str(log), "-i", str(targets)]).stdout
        # start (µs since the epoch), status, µs to the end of the answer
        rows = [l.split("\t") for l in log.read_text().splitlines() if l.count("\t") == 2]
    lat = sorted(int(r[2]) for r in rows) or [0]
    failed = re.search(r"(\d+) failed, (\d+) errored", out)
    errors = int(failed.group(1)) + int(failed.group(2)) if failed else 0
    at = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))]
    return {"requests": len(rows), "duration_us": seconds * 1_000_000, "errors": errors,
            "non2xx": sum(1 for r in rows if not r[1].startswith("2")),
            "p50_us": at(0.5), "p90_us": at(0.9), "p99_us": at(0.99), "p999_us": at(0.999), "max_us": lat[-1],
            "rps": len(rows) / seconds}


def perf_record(name, scenario, pids):
    """Samples core 1 for the length of one run; the proxy's samples are
    picked out by pid afterwards. Sampling the processes themselves (-p)
    would add a timer reprogramming at each of their context switches (a VM
    exit here), which inflated Nginx's CPU per request by half and the
    edge's by a sixth. perf itself runs on core 0, with the load generator."""
    if not PROFILE or not pids:
        return None
    out = Path(PROFILE) / f"{scenario}-{name}.perf.data"
    PROFILED[f"{scenario}-{name}"] = {"pids": pids, "requests": 0}
    return subprocess.Popen(["taskset", "-c", "0", "perf", "record", "-q", "-F", "499", "--call-graph", "dwarf,16384",
                             "-C", "1", "-o", str(out), "--", "sleep", str(SECONDS)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


PROFILED = {}  # "scenario-proxy": the proxy's pids and the requests served while perf sampled


# Where a sample's time goes, judged by its stack: the first rule that
# matches names it. Kernel rules look at the whole stack (a TCP send
# includes the loopback delivery to the client, done in the sender's
# context); user-space rules at the function the sample landed in. Nginx's
# own functions are named only where it exports them, so its HTTP/2 framing
# lands in "proxy logic".
CATEGORIES = [
    # Formatting the line and writing it out, kernel time included (the
    # edge's writer thread is named access-log).
    ("access log (formatting and writing, kernel included)", "stack", r"access_log::|(^|;)access-log;|ngx_http_log_"),
    ("kernel: scheduler (switched away and back)", "stack",
     r"(^|;)(__schedule|schedule|preempt_schedule\w*)_\[k\]|(^|;)finish_task_switch[^;]*$"),
    ("kernel: TCP send, with the loopback delivery", "stack", r"tcp_sendmsg|net_rx_action|__tcp_push"),
    ("kernel: TCP receive", "stack", r"tcp_recvmsg"),
    ("kernel: Unix socket send and receive", "stack", r"unix_stream"),
    ("kernel: epoll", "stack", r"ep_poll|epoll"),
    ("kernel: other (syscall entry and exit, fd lookup, timers)", "leaf", r"_\[k\]$"),
    ("user: TLS", "leaf", r"rustls|ring_core|^<?ring::|libssl|libcrypto|_gcm_|aes_|chacha|poly1305|sha256|sha512"),
    ("user: HTTP/2 framing", "leaf", r"^<?h2::|hpack|ngx_http_v2|hyper::proto::h2"),
    ("user: memory copies and allocation", "leaf", r"memcpy|memmove|memset|memcmp|malloc|free|^mi_|realloc|calloc"),
    ("user: async runtime", "leaf", r"^<?tokio::|\{async_fn"),
    ("user: libc system call wrappers", "leaf", r"^__GI|^__libc|pthread|^syscall|__vdso"),
    ("user: proxy logic (parsing, routing, headers)", "leaf", r""),
]


def breakdown(folded, requests):
    """µs of CPU per request in each category of CATEGORIES."""
    rules = [(name, where, re.compile(rx)) for name, where, rx in CATEGORIES]
    out = {name: 0.0 for name, _, _ in CATEGORIES}
    for line in folded.decode(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        for name, where, rx in rules:
            if rx.search(stack if where == "stack" else leaf):
                out[name] += int(n)
                break
    return {k: v / 1000 / max(requests, 1) for k, v in out.items()}


def flame_graphs():
    """One SVG per perf.data in PROFILE, by inferno (see profile.sh), and
    breakdown.md: each proxy's CPU per request by where it goes."""
    tools = ROOT / "target" / "tools" / "bin"
    tables = {}
    for data in sorted(Path(PROFILE).glob("*.perf.data")):
        name = data.name.removesuffix(".perf.data")
        profiled = PROFILED.get(name, {"pids": [], "requests": 0})
        pids = ",".join(map(str, profiled["pids"]))
        script = subprocess.run(["perf", "script", "-i", str(data), "--pid", pids], capture_output=True,
                                check=True).stdout
        folded = subprocess.run([str(tools / "inferno-collapse-perf"), "--all"], input=script, capture_output=True,
                                check=True).stdout
        (Path(PROFILE) / f"{name}.folded").write_bytes(folded)
        scenario, proxy = name.split("-", 1)
        over = {"h2": "HTTP/2 with TLS", "logged": "HTTP with access logs"}.get(scenario, scenario.upper())
        title = f"{proxy}, short requests over {over}"
        # Samples are weighted by their period: the widths are CPU time.
        svg = subprocess.run([str(tools / "inferno-flamegraph"), "--title", title, "--width", "1600", "--minwidth", "0.1",
                              "--colors", "rust", "--deterministic", "--countname", "ns of CPU"], input=folded,
                             capture_output=True, check=True).stdout
        (Path(PROFILE) / f"{name}.svg").write_bytes(svg)
        data.unlink()
        tables[name] = breakdown(folded, profiled["requests"])
        print(f"flame graph: {Path(PROFILE) / (name + '.svg')}")
    names = [f"{sc}-{px}" for sc in ("http", "https", "h2", "logged") for px in ("nginx", "nginx-buffered", "edge")
             if f"{sc}-{px}" in tables]
    lines = [f"CPU µs per request by where it goes, from the stacks perf sampled ({time.strftime('%Y-%m-%d %H:%M')}, "
             f"{SECONDS} s per proxy and scenario). perf's own cost is in these figures.", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for cat, _, _ in CATEGORIES:
        lines.append(f"| {cat} | " + " | ".join(f"{tables[n][cat]:.2f}" for n in names) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(tables[n].values()):.2f}**" for n in names) + " |")
    (Path(PROFILE) / "breakdown.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


def measured(name, port, pids, tls=False, load=wrk, scenario=None):
    a0, c0, (s0, i0), (w0, _), wc0 = accepts(), cpu_seconds(pids), switches(pids), switches(WORKER_PIDS), cpu_seconds(WORKER_PIDS)
    k0 = core_busy_seconds()
    perf = perf_record(name, scenario, pids)
    r = load(port, tls)
    if perf:
        perf.wait()
        PROFILED[f"{scenario}-{name}"]["requests"] = r["requests"]
    r["core_us_per_request"] = (core_busy_seconds() - k0) / r["requests"] * 1e6
    r["cpu_us_per_request"] = (cpu_seconds(pids) - c0) / r["requests"] * 1e6
    s1, i1 = switches(pids)
    r["switches_per_request"] = (s1 - s0) / r["requests"]
    r["worker_switches_per_request"] = (switches(WORKER_PIDS)[0] - w0) / r["requests"]
    r["preempted_per_request"] = (i1 - i0) / r["requests"]
    r["worker_cpu_us_per_request"] = (cpu_seconds(WORKER_PIDS) - wc0) / r["requests"] * 1e6
    r["upstream_conns_per_10k"] = (accepts() - a0 - 1) / r["requests"] * 10000
    if r["non2xx"] or r["errors"]:
        print(f"  !! {name}: {r['non2xx']} non-2xx answers and {r['errors']} errors: this run does not count", flush=True)
    tail = f"  p99.9 {r['p999_us']/1000:6.2f} ms  max {r['max_us']/1000:5.1f} ms" if "p999_us" in r else ""
    print(f"  {name:10} {r['rps']:>9.0f} rps  p50 {r['p50_us']/1000:6.2f} ms  p99 {r['p99_us']/1000:6.2f} ms{tail}  "
          f"cpu {r['cpu_us_per_request']:5.1f} us/req  core 1 busy {r['core_us_per_request']:5.1f} us/req  ctx sw/req {r['switches_per_request']:.2f} ({r['preempted_per_request']:.2f} preempted)  "
          f"workers: cpu {r['worker_cpu_us_per_request']:4.1f} us/req ctx sw/req {r['worker_switches_per_request']:.2f}  non-2xx {r['non2xx']}  upstream conns/10k {r['upstream_conns_per_10k']:.2f}", flush=True)
    return r


async def park(port, n):
    """Opens n long-poll /sync requests that the slow worker holds."""
    conns = []
    req = (b"GET /_matrix/client/v3/sync?since=parked&timeout=60000&access_token=syt_cGFyaw_x_y HTTP/1.1\r\n"
           b"Host: bench\r\nx-standin-delay-ms: 120000\r\n\r\n")
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(req)
        conns.append((r, w))
    await asyncio.gather(*(w.drain() for _, w in conns))
    return conns


def connected_to(path):
    """Open connections accepted on a Unix socket."""
    out = sh(["ss", "-xH"]).stdout
    return sum(1 for l in out.splitlines() if str(path) in l and "ESTAB" in l)


def long_polls(name, port, pids, run):
    sock = run / "sockets" / "synapse_inbound_client_sync1.sock"
    base = status_kib(pids, "VmRSS")

    async def scenario():
        conns = await park(port, PARKED)
        # Each parked request holds a worker connection of its own (some
        # may be keep-alive connections that were idle before).
        for _ in range(100):
            if connected_to(sock) >= PARKED:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the last requests' way through
        parked = min(PARKED, connected_to(sock))
        rss = status_kib(pids, "VmRSS")
        c0 = cpu_seconds(pids)
        short = await asyncio.get_running_loop().run_in_executor(None, lambda: wrk(port, seconds=max(5, SECONDS // 2)))
        short["cpu_us_per_request"] = (cpu_seconds(pids) - c0) / short["requests"] * 1e6
        # Idle keep-alive connections stay open; only the parked ones must go.
        idle = connected_to(sock) - parked
        for _, w in conns:
            w.transport.abort()
        t0 = time.time()
        left = parked
        while time.time() - t0 < 5:
            left = max(0, connected_to(sock) - idle)
            if left == 0:
                break
            await asyncio.sleep(0.05)
        return parked, rss, short, left, time.time() - t0

    parked, rss, short, left, gone_after = asyncio.run(scenario())
    r = {"parked": parked, "rss_per_parked_kib": (rss - base) / max(parked, 1), "short_p99_us": short["p99_us"],
         "short_rps": short["rps"], "short_cpu_us_per_request": short["cpu_us_per_request"],
         "short_percentiles_us": {k: short.get(f"{k}_us") for k in ("p50", "p90", "p99", "p999", "max")},
         "left_after_clients_vanish": left, "cancel_seconds": gone_after}
    print(f"  {name:10} parked {parked}  RSS/parked {r['rss_per_parked_kib']:.1f} KiB  short p99 meanwhile "
          f"{short['p99_us']/1000:.2f} ms (p50 {short['p50_us']/1000:.2f}, p90 {short['p90_us']/1000:.2f}, "
          f"p99.9 {short['p999_us']/1000:.2f}, max {short['max_us']/1000:.1f}; {short['rps']:.0f} rps, "
          f"cpu {short['cpu_us_per_request']:.1f} us/req)  "
          f"upstream left {left} after {gone_after:.2f} s", flush=True)
    return r


def upload(name, port, pids, blob, tries=7, proto="http"):
    """The median of seven 50 MiB uploads: on this machine the edge's times
    fall in two groups (about 0.016 s, and 0.02 to 0.04 s in a fifth to a
    third of the tries), so that the median of three was at their mercy.
    The time is curl's own, from its start of the transfer to the answer's
    end: not the few tens of ms it takes to start curl, which had been in
    every figure alike until the eleventh session and pulled every ratio
    towards 1. The worker (a stand-in that reads the whole body before it
    answers) says how many bytes reached it and their hash. proto: "http",
    "https" (HTTP/1.1 over TLS) or "h2" (HTTP/2 over TLS, by ALPN)."""
    scheme, flags = {"http": ("http", []), "https": ("https", ["-k", "--http1.1"]),
                     "h2": ("https", ["-k", "--http2"])}[proto]
    runs = []
    answer = blob.with_name(f"upload-answer-{name}.json")
    for _ in range(tries):
        reset_peak(pids)
        base = status_kib(pids, "VmRSS")
        t0 = time.time()
        out = sh(["taskset", "-c", "0", "curl", "-s", *flags, "-o", str(answer), "-w", "%{http_code} %{time_total}",
                  "--data-binary", f"@{blob}", "-H", "Content-Type: application/octet-stream",
                  f"{scheme}://127.0.0.1:{port}/_matrix/media/v3/upload"]).stdout
        wall = time.time() - t0
        peak = status_kib(pids, "VmHWM")
        code, secs = out.split()
        got = {}
        if code == "200":
            try:
                got = json.loads(answer.read_text())
            except ValueError:
                pass
        runs.append({"seconds": float(secs), "wall_seconds": wall, "status": int(code),
                     "worker_bytes": got.get("body_bytes"), "worker_xxh3": got.get("body_xxh3"),
                     "peak_rss_growth_mib": max(0, peak - base) / 1024})
    r = sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2]
    r["peak_rss_growth_mib"] = max(x["peak_rss_growth_mib"] for x in runs)
    r["all_seconds"] = [x["seconds"] for x in runs]
    r["all_wall_seconds"] = [x["wall_seconds"] for x in runs]
    size = blob.stat().st_size
    if any(x["status"] != 200 for x in runs):
        r["status"] = next(x["status"] for x in runs if x["status"] != 200)
        print(f"  !! {name}: an upload answered {r['status']}: this run does not count", flush=True)
    elif any(x["worker_bytes"] != size or x["worker_xxh3"] != runs[0]["worker_xxh3"] for x in runs):
        r["status"] = 0
        print(f"  !! {name}: the worker did not get the whole body ({[x['worker_bytes'] for x in runs]} bytes of "
              f"{size}): this run does not count", flush=True)
    print(f"  {name:10} 50 MiB upload over {proto} {r['seconds']:.4f} s (median of {tries}; with curl's start "
          f"{r['wall_seconds']:.3f} s)  status {r['status']}  worker got {r['worker_bytes']} bytes  "
          f"peak RSS growth {r['peak_rss_growth_mib']:.1f} MiB", flush=True)
    return r


def restart_workers(run, workers, without=(), log="workers2.log"):
    """The stand-in workers' Nginx started again without `without` (whose
    sockets a stand-in of our own is to take)."""
    workers.send_signal(signal.SIGQUIT)
    workers.wait(10)
    workers = start(["taskset", "-c", "1", "nginx", "-c", str(worker_nginx(run, without)), "-p", str(run)], run / log)
    wait_port(PORT["direct"])
    return workers


def wait_upload_worker(port, timeout=20):
    """Until an upload through the proxy reaches the reading stand-in."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), 1) as s:
                s.sendall(b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                          b"Connection: close\r\n\r\nhello")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            if data.startswith(b"HTTP/1.1 200") and b'"body_bytes":5' in data:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"port {port}: uploads did not reach the stand-in media1 within {timeout} s")


def main():
    if not EDGE.exists():
        raise SystemExit("build first: cargo build --release")
    for name, port in PORT.items():
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            raise SystemExit(f"port {port} ({name}) is taken: another benchmark (or its leftovers) still runs")
        except OSError:
            pass
    run = Path(tempfile.mkdtemp(prefix="synapse-edge-bench."))
    for d in ("wtmp", "ptmp"):
        (run / d).mkdir()
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "seconds": SECONDS, "rounds": ROUNDS,
               "connections": CONNS, "builds": {k: v for k, v in BUILDS.items() if v}}
    try:
        sh([str(EDGE), "demo", "--write-config", str(run)])
        sh(f"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=bench "
           f"-addext subjectAltName=DNS:bench,IP:127.0.0.1 -keyout {run}/key.pem -out {run}/cert.pem")
        (run / "edge.yaml").write_text("access_log: false\nhealth:\n  interval: 2s\n")
        (run / "edge-logged.yaml").write_text("access_log: true\nhealth:\n  interval: 2s\n")
        workers = start(["taskset", "-c", "1", "nginx", "-c", str(worker_nginx(run)), "-p", str(run)], run / "workers.log")
        wait_port(PORT["direct"])
        WORKER_PIDS[:] = children(workers.pid)
        nginx = start(["taskset", "-c", "1", "nginx", "-c", str(proxy_nginx(run)), "-p", str(run)], run / "proxy.log")

        def start_edge(binary, name, config="edge.yaml"):
            return start(["taskset", "-c", "1", str(binary), "run", "--threads", "1", "--listen", f"127.0.0.1:{PORT[name]}",
                          "--listen-tls", f"127.0.0.1:{PORT[name + '-tls']}", "--tls-cert", str(run / "cert.pem"),
                          "--tls-key", str(run / "key.pem"), "--config", str(run / config),
                          "--synapse-config", str(run / "homeserver.yaml"), "--synapse-config", str(run / "workers")],
                         run / f"{name}.log")

        edge = start_edge(EDGE, "edge")
        edge_b = start_edge(EDGE_B, "edge-b") if EDGE_B else None
        for p in (PORT["nginx"], PORT["edge"], PORT["edge-tls"]) + ((PORT["edge-b"],) if edge_b else ()):
            wait_port(p)
        wait_answers(PORT["nginx"])
        wait_answers(PORT["edge"])
        if edge_b:
            wait_answers(PORT["edge-b"])
        nginx_pids, edge_pids = children(nginx.pid), [edge.pid]
        print(f"machine: {results['machine']}\nwrk: 1 thread, {CONNS} connections, {SECONDS} s per run, {ROUNDS} rounds; "
              f"proxies and workers on core 1, wrk on core 0", flush=True)
        print("".join(f"{k}: {v}\n" for k, v in results["builds"].items()), flush=True)
        wrk(PORT["nginx"], seconds=2)
        wrk(PORT["edge"], seconds=2)
        if edge_b:
            wrk(PORT["edge-b"], seconds=2)
        for scenario, tls, load in (("http", False, wrk), ("https", True, wrk), ("h2", True, h2load)):
            if scenario not in SCENARIOS:
                continue
            print(f"short requests over {'HTTP/2 with TLS (h2load, the GETs of the mix)' if load is h2load else scenario.upper()}:")
            runs = {"direct": [], "nginx": [], "edge": []}
            if edge_b:
                runs["edge-b"] = []
            for _ in range(ROUNDS):
                if not tls:
                    runs["direct"].append(measured("direct", PORT["direct"], [], tls))
                runs["nginx"].append(measured("nginx", PORT["nginx-tls" if tls else "nginx"], nginx_pids, tls, load, scenario))
                runs["edge"].append(measured("edge", PORT["edge-tls" if tls else "edge"], edge_pids, tls, load, scenario))
                if edge_b:
                    runs["edge-b"].append(measured("edge-b", PORT["edge-b-tls" if tls else "edge-b"], [edge_b.pid], tls, load,
                                                   scenario))
            results[scenario] = runs
        if "logged" in SCENARIOS:
            # Short requests over HTTP with access logs on: each proxy's
            # default (Nginx: a write per line; the edge: batches), and
            # Nginx buffered. The edge's lines go to its stderr, a file here.
            logged = start_edge(EDGE, "edge-logged", "edge-logged.yaml")
            wait_port(PORT["edge-logged"])
            wait_answers(PORT["edge-logged"])
            wait_answers(PORT["nginx-logged"])
            wrk(PORT["nginx-logged"], seconds=2)
            wrk(PORT["edge-logged"], seconds=2)
            print("short requests over HTTP, access logs on:")
            runs = {"nginx": [], "nginx-buffered": [], "edge": []}
            for _ in range(ROUNDS):
                runs["nginx"].append(measured("nginx", PORT["nginx-logged"], nginx_pids, scenario="logged"))
                runs["nginx-buffered"].append(measured("nginx-buffered", PORT["nginx-buffered"], nginx_pids,
                                                       scenario="logged"))
                runs["edge"].append(measured("edge", PORT["edge-logged"], [logged.pid], scenario="logged"))
            logged.send_signal(signal.SIGTERM)
            logged.wait(10)
            # Each proxy must have logged every request it answered, or the
            # comparison says nothing.
            count = lambda f, mark: sum(1 for l in open(f, errors="replace") if mark in l)
            lines = {"nginx": count(run / "nginx-access.log", "HTTP/1.1"),
                     "nginx-buffered": count(run / "nginx-access-buffered.log", "HTTP/1.1"),
                     "edge": count(run / "edge-logged.log", "synapse_edge::access")}
            for k, n in lines.items():
                served = sum(r["requests"] for r in runs[k])
                print(f"  {k:14} {n} access lines for {served} requests measured (and the warm-up's)", flush=True)
                if n < served:
                    print(f"  !! {k}: fewer access lines than requests: this scenario does not count", flush=True)
            results["logged"] = runs
        if "upload" in SCENARIOS:
            # Nginx's `return` answers at once and discards the body behind
            # its answer, 4 KiB a read. For uploads media1 is a stand-in
            # that reads the whole body first, then answers with its length
            # and hash; the direct baseline reaches it over TCP.
            workers = restart_workers(run, workers, without=("media1",), log="workers-upload.log")
            media = start(["taskset", "-c", "1", str(EDGE), "standin", "--name", "media1", "--socket",
                           str(run / "sockets" / "synapse_inbound_media1.sock"), "--listen",
                           f"127.0.0.1:{PORT['direct-upload']}"], run / "standin-media1.log")
            for p in (PORT["direct-upload"], PORT["nginx"], PORT["edge"]):
                wait_upload_worker(p)
            blob = run / "50MiB.bin"
            with open(blob, "wb") as f:
                f.write(os.urandom(50 << 20))
            print("50 MiB upload (to a worker that reads it all before it answers):")
            results["upload"] = {"direct": upload("direct", PORT["direct-upload"], [], blob),
                                 "nginx": upload("nginx", PORT["nginx"], nginx_pids, blob),
                                 "edge": upload("edge", PORT["edge"], edge_pids, blob)}
            # The same over TLS, as clients on the public edge send it
            # (no direct baseline: the workers speak no TLS).
            results["upload_tls"] = {f"{name}-{proto}": upload(name, PORT[f"{name}-tls"], pids, blob, proto=proto)
                                     for proto in ("https", "h2")
                                     for name, pids in (("nginx", nginx_pids), ("edge", edge_pids))}
            media.send_signal(signal.SIGTERM)
            media.wait(10)
            workers = restart_workers(run, workers, log="workers-after-upload.log")
        if "longpoll" in SCENARIOS:
            # Long-polls: a stand-in that holds /sync replaces client_sync1.
            workers = restart_workers(run, workers, without=("client_sync1",), log="workers2.log")
            start(["taskset", "-c", "1", str(EDGE), "standin", "--name", "client_sync1", "--socket",
                   str(run / "sockets" / "synapse_inbound_client_sync1.sock")], run / "standin.log")
            # Fresh proxies: memory that earlier scenarios freed but left
            # resident would be reused by the parked requests and hide theirs.
            for p in (nginx, edge, edge_b):
                if p:
                    p.send_signal(signal.SIGTERM)
                    p.wait(10)
            nginx = start(["taskset", "-c", "1", "nginx", "-c", str(proxy_nginx(run)), "-p", str(run)], run / "proxy2.log")
            edge = start_edge(EDGE, "edge")
            for p in (PORT["nginx"], PORT["edge"]):
                wait_port(p)
            wait_answers(PORT["edge"])
            wait_answers(PORT["nginx"])
            edge_pids = [edge.pid]
            wrk(PORT["nginx"], seconds=2)
            wrk(PORT["edge"], seconds=2)
            print(f"{PARKED} parked long-poll /sync requests (fresh proxies, after a 2 s warm-up):")
            results["longpoll"] = {"nginx": long_polls("nginx", PORT["nginx"], children(nginx.pid), run),
                                   "edge": long_polls("edge", PORT["edge"], edge_pids, run)}
    finally:
        for p in reversed(procs):
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(10)
            except Exception:
                p.kill()
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {run}")
        else:
            shutil.rmtree(run, ignore_errors=True)
    if PROFILE:
        flame_graphs()
    elif all(k in results for k in ("http", "https", "h2", "logged", "upload", "longpoll")):
        report(results)
    else:
        print("(a subset of the scenarios: results/ left as it was)")


def machine():
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    return f"{cpu.group(1) if cpu else 'unknown CPU'}, {os.cpu_count()} cores, {sh('uname -r').stdout.strip()}"


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def report(res):
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(res, indent=2))
    rows = []
    for sc in ("http", "https", "h2", "logged"):
        r = res[sc]
        m = {k: {f: mean([x.get(f, 0) for x in v]) for f in ("rps", "p50_us", "p99_us", "cpu_us_per_request", "core_us_per_request", "switches_per_request",
                                                     "preempted_per_request", "worker_cpu_us_per_request", "upstream_conns_per_10k", "non2xx")} for k, v in r.items() if v}
        rows.append((sc, m))
    lines = [f"Run {res['date']} on {res['machine']}; {res['rounds']} rounds of {res['seconds']} s, wrk 1 thread, {res['connections']} connections.", ""]
    lines += [f"- {k}: {v}" for k, v in res["builds"].items()] + [""]
    lines.append("| scenario | target | rps | p50 ms | p99 ms | CPU µs/req | core 1 busy µs/req | context switches/req (of them preempted) | workers' CPU µs/req | upstream conns per 10k | non-2xx |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for sc, m in rows:
        for k, v in m.items():
            lines.append(f"| {sc} | {k} | {v['rps']:.0f} | {v['p50_us']/1000:.2f} | {v['p99_us']/1000:.2f} | "
                         f"{v['cpu_us_per_request']:.1f} | {v['core_us_per_request']:.1f} | {v['switches_per_request']:.2f} ({v['preempted_per_request']:.2f}) | {v['worker_cpu_us_per_request']:.1f} | "
                         f"{v['upstream_conns_per_10k']:.2f} | {v['non2xx']:.0f} |")
    lines.append("")
    lines.append("| ratio | value |")
    lines.append("|---|---|")
    noisy = []
    for sc, m in rows:
        e, n = m["edge"], m["nginx"]
        lines.append(f"| {sc}: rps edge / nginx | {e['rps']/n['rps']:.2f} |")
        lines.append(f"| {sc}: CPU per request edge / nginx | {e['cpu_us_per_request']/n['cpu_us_per_request']:.2f} |")
        lines.append(f"| {sc}: core 1 busy per request (proxy, workers, kernel) edge / nginx | {e['core_us_per_request']/n['core_us_per_request']:.2f} |")
        lines.append(f"| {sc}: p99 edge / nginx | {e['p99_us']/n['p99_us']:.2f} |")
        if "nginx-buffered" in m:
            b = m["nginx-buffered"]
            lines.append(f"| {sc}: rps edge / nginx with buffered logs | {e['rps']/b['rps']:.2f} |")
            lines.append(f"| {sc}: CPU per request edge / nginx with buffered logs | "
                         f"{e['cpu_us_per_request']/b['cpu_us_per_request']:.2f} |")
        if "edge-b" in m:
            b = m["edge-b"]
            lines.append(f"| {sc}: rps edge-b / nginx | {b['rps']/n['rps']:.2f} |")
            lines.append(f"| {sc}: CPU per request edge-b / nginx | {b['cpu_us_per_request']/n['cpu_us_per_request']:.2f} |")
            lines.append(f"| {sc}: p99 edge-b / nginx | {b['p99_us']/n['p99_us']:.2f} |")
        if "direct" in m:
            lines.append(f"| {sc}: rps edge / direct | {e['rps']/m['direct']['rps']:.2f} |")
            lines.append(f"| {sc}: rps nginx / direct | {n['rps']/m['direct']['rps']:.2f} |")
        ng = [x["rps"] for x in res[sc]["nginx"]]
        if len(ng) > 1:
            lines.append(f"| {sc}: A/A noise, nginx round 1 / round 2 rps | {ng[0]/ng[1]:.3f} |")
            if abs(ng[0] / ng[1] - 1) > AA_LIMIT:
                noisy.append(f"{sc} {ng[0]/ng[1]:.3f}")
    if noisy:
        # Said first: these ratios are not to be trusted.
        lines[1:1] = ["", f"**Disturbed run**: Nginx against itself differs by more than {AA_LIMIT:.0%} between rounds "
                      f"({', '.join(noisy)}); look for other load on the machine and run again before trusting "
                      f"the ratios."]
    up = res["upload"]
    up_tls = res.get("upload_tls", {})
    failed = [k for k, v in {**up, **up_tls}.items() if v["status"] != 200]
    if failed:
        # An error answer, or a worker that did not get every byte: no
        # upload figure of this run says anything.
        lines[1:1] = ["", f"**Upload does not count**: {', '.join(failed)} answered an error or did not deliver "
                      f"the whole body to the worker (see the run's output)."]
    lines.append(f"| 50 MiB upload time edge / nginx | {up['edge']['seconds']/up['nginx']['seconds']:.2f} |")
    for proto, over in (("https", "HTTPS"), ("h2", "HTTP/2")):
        if f"edge-{proto}" in up_tls:
            lines.append(f"| 50 MiB upload over {over}, time edge / nginx | "
                         f"{up_tls[f'edge-{proto}']['seconds']/up_tls[f'nginx-{proto}']['seconds']:.2f} |")
    lines.append("")
    lines.append("| 50 MiB upload (median of 7; to a worker that reads it all first) | seconds (curl's) | "
                 "seconds with curl's start | bytes the worker got | peak RSS growth MiB |")
    lines.append("|---|---|---|---|---|")
    for k, v in {**up, **up_tls}.items():
        lines.append(f"| {k} | {v['seconds']:.4f} | {v['wall_seconds']:.3f} | {v['worker_bytes']} | "
                     f"{v['peak_rss_growth_mib']:.1f} |")
    lp = res["longpoll"]
    lines.append("")
    lines.append("| long-polls | parked | RSS per parked KiB | short p99 meanwhile ms | upstream requests left after clients vanish | seconds |")
    lines.append("|---|---|---|---|---|---|")
    for k, v in lp.items():
        lines.append(f"| {k} | {v['parked']} | {v['rss_per_parked_kib']:.1f} | {v['short_p99_us']/1000:.2f} | {v['left_after_clients_vanish']} | {v['cancel_seconds']:.2f} |")
    text = "\n".join(lines) + "\n"
    (out / "latest.md").write_text(text)
    print("\n" + text)
    chart(rows, out / "chart.png")


def chart(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no chart)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["direct", "nginx", "edge", "edge-b"]
    colors = {"direct": "#999", "nginx": "#2a7", "edge": "#35c", "edge-b": "#9ad"}
    # run.sh's two builds by what they are; any other A/B as edge and edge-b.
    pgo = os.environ.get("BENCH_EDGE_NAME", "").startswith("PGO") and os.environ.get("BENCH_EDGE_B_NAME", "").startswith("plain")
    legend = {"edge": "edge (PGO build)", "edge-b": "edge (plain build)"} if pgo else {}
    for ax, field, title, scale in ((axes[0], "rps", "requests per second", 1), (axes[1], "p99_us", "p99 latency (ms)", 1000)):
        for i, (sc, m) in enumerate(rows):
            for j, k in enumerate(labels):
                if k in m:
                    ax.bar(i * 5 + j, m[k][field] / scale, color=colors[k], label=legend.get(k, k) if i == 0 else None)
        ax.set_xticks([i * 5 + 1.5 for i in range(len(rows))])
        names = {"h2": "HTTP/2", "logged": "HTTP,\naccess logs"}
        ax.set_xticklabels([names.get(sc, sc.upper()) for sc, _ in rows])
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("synapse-edge vs Nginx vs direct (same stand-in workers)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"chart: {path}")


if __name__ == "__main__":
    main()
