#!/usr/bin/python3
"""Benign traffic for the lab: the busy but innocent hosts the detector must leave alone.

  webclients   hundreds of external clients (one source address each) fetching pages
               from the internal web server, over HTTP and HTTPS
  browser      a browser-like client: pages and their assets from many external HTTPS
               hosts, a few connections per host, keep-alive, think time between pages
  dnsload      queries of random names to a local resolver (which queries upstream)
  udp-server   answers each request datagram with a few larger ones (QUIC-like, UDP 443)
  udp-client   a handful of UDP 443 "connections" to a few servers

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
    args = ap.parse_args()
    {
        "webclients": webclients,
        "browser": browser,
        "dnsload": dnsload,
        "udp-server": udp_server,
        "udp-client": udp_client,
    }[args.mode](args)


if __name__ == "__main__":
    main()
