#!/usr/bin/python3
"""Transmission (transmission-daemon, Debian's) as one of the lab's internal P2P hosts.

Writes the daemon's settings.json into its own configuration directory, runs
`transmission-daemon -f` with it, adds the torrent with `transmission-remote -a`, then
polls the daemon's RPC (127.0.0.1 of the host's namespace) and writes JSON lines of
events in the format torrent.py's clients write: `started`, `first_payload` (the first
poll that sees downloadedEver or haveValid above 0), `status` every 5 s.

The session: protocol encryption required, DHT, PEX, local peer discovery, uTP and port
mapping off (TCP only), listening on --port (a high port, not a client default), the
rest Transmission's defaults (50 peers per torrent, 200 in all).

Standard library only. Stops the daemon on SIGTERM or SIGINT.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

STOP = False


def _stop(_sig, _frame):
    global STOP
    STOP = True


signal.signal(signal.SIGTERM, _stop)
signal.signal(signal.SIGINT, _stop)


class Rpc:
    """Transmission's JSON RPC, with its CSRF session id (409, then retry)."""

    def __init__(self, port):
        self.url = f"http://127.0.0.1:{port}/transmission/rpc"
        self.session = ""

    def call(self, method, **arguments):
        body = json.dumps({"method": method, "arguments": arguments}).encode()
        for _ in range(2):
            req = urllib.request.Request(
                self.url,
                data=body,
                headers={
                    "X-Transmission-Session-Id": self.session,
                    "Content-Type": "application/json",
                },
            )
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    return json.load(r)["arguments"]
            except urllib.error.HTTPError as e:
                if e.code != 409:
                    raise
                self.session = e.headers.get("X-Transmission-Session-Id", "")
        raise RuntimeError("RPC: no session id")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True, help="the host's address (peer socket)")
    ap.add_argument("--port", type=int, required=True, help="peer port")
    ap.add_argument("--rpc-port", type=int, default=9091)
    ap.add_argument("--torrent", required=True)
    ap.add_argument("--dir", required=True, help="config and download directories go here")
    ap.add_argument("--events", required=True)
    args = ap.parse_args()

    config = os.path.join(args.dir, "config")
    downloads = os.path.join(args.dir, "downloads")
    os.makedirs(config, exist_ok=True)
    os.makedirs(downloads, exist_ok=True)
    settings = {
        "bind-address-ipv4": args.addr,
        "download-dir": downloads,
        "incomplete-dir-enabled": False,
        "encryption": 2,  # required
        "dht-enabled": False,
        "pex-enabled": False,
        "lpd-enabled": False,
        "utp-enabled": False,
        "port-forwarding-enabled": False,
        "peer-port": args.port,
        "peer-port-random-on-start": False,
        "rpc-enabled": True,
        "rpc-bind-address": "127.0.0.1",
        "rpc-port": args.rpc_port,
        "rpc-authentication-required": False,
        "rpc-whitelist-enabled": True,
        "rpc-whitelist": "127.0.0.1",
        "watch-dir-enabled": False,
        "start-added-torrents": True,
        "message-level": 2,
    }
    with open(os.path.join(config, "settings.json"), "w") as f:
        json.dump(settings, f, indent=4)

    events = open(args.events, "a", buffering=1)

    def event(kind, **kw):
        events.write(json.dumps({"event": kind, "t": time.time(), **kw}) + "\n")

    daemon = subprocess.Popen(["transmission-daemon", "-f", "-g", config])
    rpc = Rpc(args.rpc_port)
    deadline = time.time() + 20
    while True:
        try:
            rpc.call("session-get")
            break
        except (OSError, RuntimeError):
            if time.time() > deadline or daemon.poll() is not None:
                print("transmission.py: the daemon's RPC never answered", file=sys.stderr, flush=True)
                daemon.terminate()
                sys.exit(1)
            time.sleep(0.2)
    # As a user would: transmission-remote adds the torrent, which starts at once.
    subprocess.run(
        ["transmission-remote", f"127.0.0.1:{args.rpc_port}", "-a", args.torrent],
        check=True,
    )
    event("started", addr=args.addr, port=args.port, seed=False)
    print("transmission.py: torrent added", file=sys.stderr, flush=True)

    fields = ["downloadedEver", "uploadedEver", "haveValid", "peersConnected", "percentDone", "rateDownload"]
    first_payload = False
    last_status = 0.0
    while not STOP:
        if daemon.poll() is not None:
            print(f"transmission.py: the daemon exited ({daemon.returncode})", file=sys.stderr, flush=True)
            sys.exit(1)
        try:
            ts = rpc.call("torrent-get", fields=fields)["torrents"]
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            print(f"transmission.py: RPC: {e}", file=sys.stderr, flush=True)
            ts = []
        if ts:
            t = ts[0]
            if not first_payload and (t["downloadedEver"] > 0 or t["haveValid"] > 0):
                first_payload = True
                event("first_payload")
            if time.time() - last_status >= 5:
                last_status = time.time()
                event(
                    "status",
                    peers=t["peersConnected"],
                    down=t["downloadedEver"],
                    up=t["uploadedEver"],
                    progress=round(t["percentDone"], 4),
                )
        time.sleep(0.2)
    # A stop signal sent to the process group has reached the daemon too, and
    # Transmission 3.00 may crash ("corrupted double-linked list") when a second one
    # arrives while it closes: give it time to close by itself first.
    try:
        daemon.wait(timeout=3)
    except subprocess.TimeoutExpired:
        daemon.terminate()
        try:
            daemon.wait(timeout=7)
        except subprocess.TimeoutExpired:
            daemon.kill()


if __name__ == "__main__":
    main()
