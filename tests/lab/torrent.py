#!/usr/bin/python3
"""Real BitTorrent peers for the lab, on libtorrent-rasterbar (python3-libtorrent).

Two modes:

  swarm   many libtorrent sessions in one process, each bound to its own address
          (listen and outgoing), seeding torrent A with a per-session upload limit that
          also applies to peers on private addresses; some of them also download
          torrent B (from the lab's internal seeder). With --no-dht --no-utp
          --encryption forced and a private torrent, the seeders of a private tracker.
  client  one session: an internal host that downloads (or seeds) one torrent, writing
          JSON lines of events (first payload byte, first piece, periodic status) so the
          lab knows when P2P traffic began.

Runs under Debian's /usr/bin/python3 (the one with the libtorrent module). Stops on
SIGTERM or SIGINT.
"""

import argparse
import json
import os
import signal
import sys
import time

import libtorrent as lt

STOP = False


def _stop(_sig, _frame):
    global STOP
    STOP = True


signal.signal(signal.SIGTERM, _stop)
signal.signal(signal.SIGINT, _stop)


def settings(addr, port, upload_rate, encryption, utp, dht_nodes):
    s = {
        "listen_interfaces": f"{addr}:{port}",
        "outgoing_interfaces": addr,
        "enable_dht": bool(dht_nodes),
        "dht_bootstrap_nodes": dht_nodes,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_outgoing_utp": utp,
        "enable_incoming_utp": utp,
        "enable_outgoing_tcp": True,
        "enable_incoming_tcp": True,
        "upload_rate_limit": upload_rate,
        "alert_mask": lt.alert.category_t.status_notification
        | lt.alert.category_t.error_notification
        | lt.alert.category_t.piece_progress_notification,
        # Small sessions: the lab runs hundreds in one process.
        "aio_threads": 1,
        "hashing_threads": 1,
        "connections_limit": 200,
        "allow_multiple_connections_per_ip": True,
        "user_agent": "lab-peer",
    }
    if encryption == "forced":
        s["out_enc_policy"] = int(lt.enc_policy.forced)
        s["in_enc_policy"] = int(lt.enc_policy.forced)
        s["allowed_enc_level"] = int(lt.enc_level.rc4)
        s["prefer_rc4"] = True
    else:
        s["out_enc_policy"] = int(lt.enc_policy.enabled)
        s["in_enc_policy"] = int(lt.enc_policy.enabled)
    return s


def throttle_private_peers(ses):
    """libtorrent exempts peers on private addresses from rate limits; the lab's LAN is
    private, so put every peer in the global (rate-limited) class."""
    f = lt.ip_filter()
    f.add_rule("0.0.0.0", "255.255.255.255", 1 << lt.session.global_peer_class_id)
    ses.set_peer_class_filter(f)


def add(ses, torrent, save, seed):
    p = lt.add_torrent_params()
    p.ti = lt.torrent_info(torrent)
    p.save_path = save
    if seed:
        p.flags |= lt.torrent_flags.seed_mode
    p.flags &= ~lt.torrent_flags.auto_managed
    p.flags &= ~lt.torrent_flags.paused
    return ses.add_torrent(p)


def drain(ses):
    for a in ses.pop_alerts():
        if isinstance(a, (lt.listen_failed_alert,)):
            print(f"torrent.py: {a.message()}", file=sys.stderr, flush=True)


def swarm(args):
    # "ADDR PORT" a line: each peer listens on a port of its own, as real peers do.
    peers = [line.split() for line in open(args.addrs) if line.strip()]
    dht = ",".join(f"{a}:{p}" for a, p in peers[:8]) if args.dht else ""
    sessions = []
    handles = []
    for i, (addr, port) in enumerate(peers):
        ses = lt.session(
            settings(addr, port, args.upload_rate, args.encryption, args.utp, dht)
        )
        throttle_private_peers(ses)
        handles.append(add(ses, args.seed_torrent, args.seed_data, True))
        if i < args.leechers and args.leech_torrent:
            d = os.path.join(args.leech_dir, str(i))
            os.makedirs(d, exist_ok=True)
            add(ses, args.leech_torrent, d, False)
        sessions.append(ses)
    print(f"torrent.py: {len(sessions)} peers up", file=sys.stderr, flush=True)
    while not STOP:
        time.sleep(0.5)
        for ses in sessions:
            drain(ses)
    for ses in sessions:
        ses.pause()


def client(args):
    ses = lt.session(
        settings(
            args.addr, args.port, args.upload_rate, args.encryption, args.utp, args.dht
        )
    )
    if args.seed:
        throttle_private_peers(ses)
    h = add(ses, args.torrent, args.save, args.seed)
    events = open(args.events, "a", buffering=1)

    def event(kind, **kw):
        events.write(json.dumps({"event": kind, "t": time.time(), **kw}) + "\n")

    event("started", addr=args.addr, port=args.port, seed=args.seed)
    first_payload = first_piece = False
    last_status = 0.0
    while not STOP:
        time.sleep(0.2)
        for a in ses.pop_alerts():
            if isinstance(a, lt.piece_finished_alert) and not first_piece:
                first_piece = True
                event("first_piece")
        st = h.status()
        moved = st.total_payload_download + st.total_payload_upload
        if moved > 0 and not first_payload:
            first_payload = True
            event("first_payload")
        if time.time() - last_status >= 5:
            last_status = time.time()
            event(
                "status",
                peers=st.num_peers,
                down=st.total_payload_download,
                up=st.total_payload_upload,
                progress=round(st.progress, 4),
            )
    ses.pause()


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("swarm")
    s.add_argument("--addrs", required=True, help='file of "ADDR PORT" lines')
    s.add_argument("--seed-torrent", required=True)
    s.add_argument("--seed-data", required=True)
    s.add_argument("--leech-torrent")
    s.add_argument("--leech-dir", default="/tmp")
    s.add_argument("--leechers", type=int, default=0)
    s.add_argument("--upload-rate", type=int, default=16384)
    s.add_argument("--encryption", choices=["forced", "enabled"], default="enabled")
    s.add_argument("--utp", action=argparse.BooleanOptionalAction, default=True)
    s.add_argument(
        "--dht",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="DHT among the swarm (bootstrapped from its first 8 peers)",
    )
    c = sub.add_parser("client")
    c.add_argument("--addr", required=True)
    c.add_argument("--port", type=int, default=6881)
    c.add_argument("--torrent", required=True)
    c.add_argument("--save", required=True)
    c.add_argument("--seed", action="store_true")
    c.add_argument("--encryption", choices=["forced", "enabled"], default="enabled")
    c.add_argument("--utp", action=argparse.BooleanOptionalAction, default=True)
    c.add_argument("--upload-rate", type=int, default=0)
    c.add_argument("--dht", default="", help="DHT bootstrap nodes, ADDR:PORT,...")
    c.add_argument("--events", required=True)
    args = ap.parse_args()
    if args.mode == "swarm":
        swarm(args)
    else:
        client(args)


if __name__ == "__main__":
    main()
