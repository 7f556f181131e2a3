#!/usr/bin/python3
"""Benign traffic for the lab: the busy but innocent hosts the detector must leave alone.

  webclients   hundreds of external clients (one source address each) fetching pages
               from the internal web server, over HTTP and HTTPS
  browser      a browser-like client: pages and their assets from many external HTTPS
               hosts, a few connections per host, keep-alive, think time between pages
  dnsload      queries of random names to a local resolver (which queries upstream)
  udp-server   answers each request datagram with a few larger ones (QUIC-like, UDP 443)
  udp-client   a handful of UDP 443 "connections" to a few servers
  poller       a monitoring server scraping many external hosts on one high port (as
               Prometheus scrapes node_exporter on 9100): one kept-alive connection per
               target, each scraped every --interval seconds, the targets spread over it
  sync         many long-lived TLS connections to distinct servers (a sync or messaging
               client): each idle most of the time, a small exchange every 15-45 s
  call-server  a STUN server and the media peers of a video call: answers STUN binding
               requests, and each media datagram with one of its own
  call         a video call: STUN binding to the server, ICE checks to each peer, then
               RTP-like media to and from a few peers, all on one local UDP port
  game-peers   the other players of a peer-to-peer game session: each on its own address
               and port, learning the client's address from its first datagram, then
               sending its own state at its own tick rate and answering pings
  game         a peer-to-peer game session: one UDP socket on the game's port, a stable
               set of peers, small state datagrams to each at the tick rate, a ping to
               each every second
  upload       a bulk uploader (a backup or sync client): one kept-alive TLS connection
               to each of many storage endpoints, each PUTting parts of a few MiB one
               after another at a limited rate, for as long as it runs

Standard library only. Stops on SIGTERM or SIGINT. `--seed` makes the choices reproducible.
"""

import argparse
import http.client
import random
import signal
import socket
import ssl
import struct
import sys
import threading
import time

STOP = threading.Event()


def _stop(_sig, _frame):
    STOP.set()


signal.signal(signal.SIGTERM, _stop)
signal.signal(signal.SIGINT, _stop)


def tls():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def fetch(conn, path):
    conn.request("GET", path, headers={"User-Agent": "lab-browser/1.0"})
    r = conn.getresponse()
    r.read()
    return r.status


def webclients(args):
    addrs = [a.strip() for a in open(args.addrs) if a.strip()]
    rng = random.Random(args.seed)
    ctx = tls()

    def worker(mine):
        r = random.Random(rng.random())
        while not STOP.is_set():
            src = r.choice(mine)
            try:
                if r.random() < 0.5:
                    c = http.client.HTTPConnection(
                        args.server, 80, timeout=5, source_address=(src, 0)
                    )
                else:
                    c = http.client.HTTPSConnection(
                        args.server, 443, timeout=5, source_address=(src, 0), context=ctx
                    )
                for _ in range(r.randint(1, 4)):
                    fetch(c, r.choice(["/", "/index.html", "/a/1", "/a/2", "/big"]))
                c.close()
            except OSError as e:
                print(f"benign.py webclients: {e}", file=sys.stderr, flush=True)
            STOP.wait(r.expovariate(args.rate / args.workers))

    chunks = [addrs[i :: args.workers] for i in range(args.workers)]
    ts = [threading.Thread(target=worker, args=(c,), daemon=True) for c in chunks if c]
    for t in ts:
        t.start()
    STOP.wait()


def browser(args):
    hosts = [a.strip() for a in open(args.hosts) if a.strip()]
    rng = random.Random(args.seed)
    ctx = tls()
    while not STOP.is_set():
        # A page: the HTML from one host, assets from a handful of others (CDNs).
        page_host = rng.choice(hosts)
        asset_hosts = rng.sample(hosts, min(len(hosts), rng.randint(3, 10)))
        try:
            c = http.client.HTTPSConnection(page_host, 443, timeout=5, context=ctx)
            fetch(c, "/index.html")
            c.close()
            for h in asset_hosts:
                if STOP.is_set():
                    break
                c = http.client.HTTPSConnection(h, 443, timeout=5, context=ctx)
                for _ in range(rng.randint(2, 8)):
                    fetch(c, rng.choice(["/a/1", "/a/2", "/a/3", "/big"]))
                c.close()
        except OSError as e:
            print(f"benign.py browser: {e}", file=sys.stderr, flush=True)
        STOP.wait(rng.uniform(0.5, 3.0))


def dns_query(name, qid):
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + q + struct.pack(">HH", 1, 1)


def dnsload(args):
    rng = random.Random(args.seed)
    words = ["news", "mail", "cdn", "api", "img", "static", "video", "shop", "maps"]
    tlds = ["com", "net", "org", "example", "test"]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    while not STOP.is_set():
        name = f"{rng.choice(words)}{rng.randint(1, 5000)}.{rng.choice(words)}.{rng.choice(tlds)}"
        try:
            s.sendto(dns_query(name, rng.randint(0, 65535)), (args.resolver, 53))
            s.recvfrom(4096)
        except OSError:
            pass
        STOP.wait(rng.expovariate(args.rate))


def udp_server(args):
    import selectors

    sel = selectors.DefaultSelector()
    for addr in [a.strip() for a in open(args.addrs) if a.strip()]:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, args.port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    while not STOP.is_set():
        for key, _ in sel.select(timeout=0.5):
            try:
                data, peer = key.fileobj.recvfrom(2048)
            except OSError:
                continue
            for _ in range(args.replies):
                key.fileobj.sendto(b"\x40" + bytes(1199), peer)


def udp_client(args):
    servers = [a.strip() for a in open(args.servers) if a.strip()]
    rng = random.Random(args.seed)
    socks = []
    for srv in servers:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((srv, args.port))
        s.setblocking(False)
        socks.append(s)
    while not STOP.is_set():
        s = rng.choice(socks)
        try:
            s.send(b"\xc0" + bytes(rng.randint(40, 1200)))
            while True:
                s.recv(2048)
        except BlockingIOError:
            pass
        except OSError:
            pass
        STOP.wait(rng.expovariate(args.rate))


def poller(args):
    targets = [a.strip() for a in open(args.targets) if a.strip()]
    conns = {}
    start = time.monotonic()
    n = 0
    while not STOP.is_set():
        # Target i is scraped at i/len of each interval: the load spread evenly.
        i = n % len(targets)
        due = start + (n // len(targets)) * args.interval + i * args.interval / len(targets)
        if STOP.wait(max(0.0, due - time.monotonic())):
            break
        t = targets[i]
        try:
            c = conns.get(t)
            if c is None:
                c = conns[t] = http.client.HTTPConnection(t, args.port, timeout=5)
            fetch(c, "/metrics")
        except (OSError, http.client.HTTPException) as e:
            print(f"benign.py poller: {t}: {e}", file=sys.stderr, flush=True)
            conns.pop(t, None)
        n += 1


def sync(args):
    hosts = [a.strip() for a in open(args.hosts) if a.strip()][: args.count]
    rng = random.Random(args.seed)
    ctx = tls()
    conns = {}
    due = {h: time.monotonic() + rng.uniform(0, 5) for h in hosts}
    while not STOP.is_set():
        h = min(due, key=due.get)
        if STOP.wait(max(0.0, due[h] - time.monotonic())):
            break
        try:
            c = conns.get(h)
            if c is None:
                c = conns[h] = http.client.HTTPSConnection(h, 443, timeout=5, context=ctx)
            # Mostly a small message; now and then a larger sync.
            fetch(c, "/a/1" if rng.random() < 0.1 else "/a/3")
        except (OSError, http.client.HTTPException) as e:
            print(f"benign.py sync: {h}: {e}", file=sys.stderr, flush=True)
            conns.pop(h, None)
        due[h] = time.monotonic() + rng.uniform(15, 45)


STUN_COOKIE = 0x2112A442


def stun_request():
    return struct.pack(">HHI", 0x0001, 0, STUN_COOKIE) + random.randbytes(12)


def is_stun(data):
    return len(data) >= 20 and data[0] & 0xC0 == 0 and struct.unpack(">I", data[4:8])[0] == STUN_COOKIE


def stun_success(request, peer):
    """A binding success response with XOR-MAPPED-ADDRESS (RFC 5389)."""
    addr = struct.unpack(">I", socket.inet_aton(peer[0]))[0]
    attr = struct.pack(">HHBBHI", 0x0020, 8, 0, 1, peer[1] ^ (STUN_COOKIE >> 16), addr ^ STUN_COOKIE)
    return struct.pack(">HH", 0x0101, len(attr)) + request[4:20] + attr


def rtp(seq, ssrc, size):
    # Version 2, payload type 96 (dynamic, video), then sequence, timestamp, SSRC.
    return struct.pack(">BBHII", 0x80, 96, seq & 0xFFFF, (seq * 3000) & 0xFFFFFFFF, ssrc) + random.randbytes(size - 12)


def call_server(args):
    import selectors

    sel = selectors.DefaultSelector()
    binds = [(args.stun, 3478)] + [
        (a, int(p)) for a, p in (line.split() for line in open(args.peers) if line.strip())
    ]
    for addr in binds:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(addr)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    seq = 0
    while not STOP.is_set():
        for key, _ in sel.select(timeout=0.5):
            try:
                data, peer = key.fileobj.recvfrom(2048)
                if is_stun(data):
                    key.fileobj.sendto(stun_success(data, peer), peer)
                else:
                    seq += 1
                    key.fileobj.sendto(rtp(seq, 0x5EED, random.randint(300, 1200)), peer)
            except OSError:
                continue


def call(args):
    peers = [(a, int(p)) for a, p in (line.split() for line in open(args.peers) if line.strip())]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    s.settimeout(2)
    # Learn the public address from the STUN server, then check each peer (ICE).
    for target in [(args.stun, 3478)] + peers:
        try:
            s.sendto(stun_request(), target)
            s.recvfrom(2048)
        except OSError as e:
            print(f"benign.py call: STUN to {target}: {e}", file=sys.stderr, flush=True)
    s.setblocking(False)
    seq, last_check = 0, time.monotonic()
    while not STOP.is_set():
        seq += 1
        for p in peers:
            try:
                s.sendto(rtp(seq, 0xCA11, random.randint(300, 1200)), p)
            except OSError:
                pass
        # Consent freshness (RFC 7675): a STUN check to each peer every 5 s.
        if time.monotonic() - last_check >= 5:
            last_check = time.monotonic()
            for p in peers:
                try:
                    s.sendto(stun_request(), p)
                except OSError:
                    pass
        try:
            while True:
                s.recv(2048)
        except (BlockingIOError, OSError):
            pass
        STOP.wait(1.0 / args.pps)


GAME_HELLO, GAME_STATE, GAME_PING, GAME_PONG = 1, 2, 3, 4


def game_msg(kind, session, seq, size):
    """A game datagram: type, session, sequence, sender's clock (ms), then state."""
    head = struct.pack(">BIHI", kind, session, seq & 0xFFFF, int(time.monotonic() * 1000) & 0xFFFFFFFF)
    return head + random.randbytes(max(0, size - len(head)))


def game_peers(args):
    import selectors

    rng = random.Random(args.seed + 7)
    sel = selectors.DefaultSelector()
    peers = []
    for a, p in (line.split() for line in open(args.peers) if line.strip()):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((a, int(p)))
        s.setblocking(False)
        # Each player's own tick rate; the client is unknown until it says hello.
        peer = {"sock": s, "client": None, "tick": 1.0 / rng.uniform(args.min_tick, args.max_tick),
                "next": 0.0, "seq": 0, "session": rng.getrandbits(32)}
        sel.register(s, selectors.EVENT_READ, peer)
        peers.append(peer)
    while not STOP.is_set():
        now = time.monotonic()
        for peer in peers:
            if peer["client"] is not None and now >= peer["next"]:
                peer["seq"] += 1
                try:
                    peer["sock"].sendto(
                        game_msg(GAME_STATE, peer["session"], peer["seq"], rng.randint(60, 200)), peer["client"]
                    )
                except OSError:
                    pass
                peer["next"] = max(peer["next"] + peer["tick"], now - peer["tick"])
        due = [p["next"] for p in peers if p["client"] is not None]
        timeout = max(0.0, min(due) - time.monotonic()) if due else 0.5
        for key, _ in sel.select(timeout=min(timeout, 0.5)):
            peer = key.data
            try:
                while True:
                    data, src = peer["sock"].recvfrom(2048)
                    if peer["client"] is None:
                        peer["next"] = time.monotonic()
                    peer["client"] = src
                    if data and data[0] == GAME_PING:
                        peer["sock"].sendto(game_msg(GAME_PONG, peer["session"], 0, rng.randint(60, 80)), src)
            except (BlockingIOError, OSError):
                pass


def game(args):
    peers = [(a, int(p)) for a, p in (line.split() for line in open(args.peers) if line.strip())]
    rng = random.Random(args.seed + 8)
    session = rng.getrandbits(32)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", args.port))
    s.setblocking(False)
    # Joining: a hello to every player of the session (the lobby handed out the list).
    for p in peers:
        s.sendto(game_msg(GAME_HELLO, session, 0, 80), p)
    tick = 1.0 / args.tick
    seq, due, last_ping = 0, time.monotonic(), time.monotonic()
    while not STOP.is_set():
        seq += 1
        ping = time.monotonic() - last_ping >= 1.0
        if ping:
            last_ping = time.monotonic()
        for p in peers:
            try:
                s.sendto(game_msg(GAME_STATE, session, seq, rng.randint(60, 200)), p)
                if ping:
                    s.sendto(game_msg(GAME_PING, session, seq, rng.randint(60, 80)), p)
            except OSError:
                pass
        try:
            while True:
                s.recv(2048)
        except (BlockingIOError, OSError):
            pass
        due += tick
        STOP.wait(max(0.0, due - time.monotonic()))


def upload(args):
    endpoints = [a.strip() for a in open(args.endpoints) if a.strip()]
    rng = random.Random(args.seed + 9)
    ctx = tls()
    block = random.Random(args.seed).randbytes(1 << 20)
    chunk = 16 * 1024

    def body(size, rate):
        """`size` bytes, paced to `rate` bytes/s (the uploader's bandwidth limit)."""
        start, sent = time.monotonic(), 0
        while sent < size and not STOP.is_set():
            n = min(chunk, size - sent)
            off = (sent % len(block)) & ~(chunk - 1)
            yield block[off : off + n]
            sent += n
            STOP.wait(max(0.0, start + sent / rate - time.monotonic()))

    def worker(i, host, r):
        STOP.wait(r.uniform(0, 5))
        conn, part = None, 0
        while not STOP.is_set():
            size = r.randint(args.min_part, args.max_part) << 20
            try:
                if conn is None:
                    conn = http.client.HTTPSConnection(host, 443, timeout=30, context=ctx)
                conn.request(
                    "PUT",
                    f"/upload/{i}/part-{part % 2}",
                    body=body(size, args.rate),
                    headers={"Content-Length": str(size), "Content-Type": "application/octet-stream",
                             "User-Agent": "lab-backup/1.0"},
                )
                r2 = conn.getresponse()
                r2.read()
                if r2.status >= 300:
                    print(f"benign.py upload: {host}: {r2.status}", file=sys.stderr, flush=True)
            except (OSError, http.client.HTTPException) as e:
                if not STOP.is_set():
                    print(f"benign.py upload: {host}: {e}", file=sys.stderr, flush=True)
                conn = None
                STOP.wait(2)
            part += 1

    ts = [
        threading.Thread(target=worker, args=(i, h, random.Random(rng.random())), daemon=True)
        for i, h in enumerate(endpoints)
    ]
    for t in ts:
        t.start()
    STOP.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    sub = ap.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("webclients")
    w.add_argument("--addrs", required=True)
    w.add_argument("--server", required=True)
    w.add_argument("--rate", type=float, default=20.0, help="connections per second")
    w.add_argument("--workers", type=int, default=16)
    b = sub.add_parser("browser")
    b.add_argument("--hosts", required=True)
    d = sub.add_parser("dnsload")
    d.add_argument("--resolver", default="127.0.0.1")
    d.add_argument("--rate", type=float, default=20.0)
    us = sub.add_parser("udp-server")
    us.add_argument("--addrs", required=True, help="addresses to serve, one a line")
    us.add_argument("--port", type=int, default=443)
    us.add_argument("--replies", type=int, default=3)
    uc = sub.add_parser("udp-client")
    uc.add_argument("--servers", required=True)
    uc.add_argument("--port", type=int, default=443)
    uc.add_argument("--rate", type=float, default=30.0)
    po = sub.add_parser("poller")
    po.add_argument("--targets", required=True)
    po.add_argument("--port", type=int, default=9100)
    po.add_argument("--interval", type=float, default=15.0)
    sy = sub.add_parser("sync")
    sy.add_argument("--hosts", required=True)
    sy.add_argument("--count", type=int, default=50)
    cs = sub.add_parser("call-server")
    cs.add_argument("--stun", required=True, help="the STUN server's address")
    cs.add_argument("--peers", required=True, help='media peers, "ADDR PORT" a line')
    ca = sub.add_parser("call")
    ca.add_argument("--stun", required=True)
    ca.add_argument("--peers", required=True)
    ca.add_argument("--pps", type=float, default=50.0, help="media datagrams per second to each peer")
    gp = sub.add_parser("game-peers")
    gp.add_argument("--peers", required=True, help='players, "ADDR PORT" a line')
    gp.add_argument("--min-tick", type=float, default=20.0)
    gp.add_argument("--max-tick", type=float, default=30.0)
    ga = sub.add_parser("game")
    ga.add_argument("--peers", required=True, help='players, "ADDR PORT" a line')
    ga.add_argument("--port", type=int, default=3074, help="the game's UDP port")
    ga.add_argument("--tick", type=float, default=25.0, help="state datagrams per second to each peer")
    up = sub.add_parser("upload")
    up.add_argument("--endpoints", required=True, help="storage endpoints (HTTPS), one a line")
    up.add_argument("--rate", type=float, default=48 * 1024, help="bytes/s per connection")
    up.add_argument("--min-part", type=int, default=4, help="MiB")
    up.add_argument("--max-part", type=int, default=8, help="MiB")
    args = ap.parse_args()
    {
        "webclients": webclients,
        "browser": browser,
        "dnsload": dnsload,
        "udp-server": udp_server,
        "udp-client": udp_client,
        "poller": poller,
        "sync": sync,
        "call-server": call_server,
        "call": call,
        "game-peers": game_peers,
        "game": game,
        "upload": upload,
    }[args.mode](args)


if __name__ == "__main__":
    main()
