#!/usr/bin/env python3
"""A do-nothing vhost-user backend for checking QEMU's vhost-user-hmmgpu
side without the real hmmgpu-device: it answers the feature negotiation and
GET_CONFIG (the hmmgpu config space of docs/device-spec.md), accepts the
vring setup messages and never processes a queue.

    dummy-backend.py --socket PATH --vram-size SIZE   (SIZE: bytes, or 64M, 1G)

Listens on PATH (QEMU connects as the client) and serves one connection at a
time until killed.
"""
import argparse, array, os, socket, struct, sys

VERSION, REPLY = 0x1, 0x4
GET_FEATURES, SET_FEATURES, SET_OWNER = 1, 2, 3
GET_VRING_BASE, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_CONFIG = 11, 15, 17, 24
NAMES = {1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER",
         5: "SET_MEM_TABLE", 8: "SET_VRING_NUM", 9: "SET_VRING_ADDR",
         10: "SET_VRING_BASE", 11: "GET_VRING_BASE", 12: "SET_VRING_KICK",
         13: "SET_VRING_CALL", 14: "SET_VRING_ERR", 15: "GET_PROTOCOL_FEATURES",
         16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM", 18: "SET_VRING_ENABLE",
         24: "GET_CONFIG", 25: "SET_CONFIG"}
FEATURES = (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28)  # VERSION_1, PROTOCOL_FEATURES, EVENT_IDX, INDIRECT_DESC
PROTOCOL_FEATURES = (1 << 0) | (1 << 9)                    # MQ, CONFIG


def parse_size(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
    return int(s[:-1] if mult > 1 else s) * mult


def recv_exact(conn, n, fds):
    buf = b""
    while len(buf) < n:
        data, anc, _, _ = conn.recvmsg(n - len(buf), socket.CMSG_SPACE(8 * 4))
        if not data:
            return None
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cdata[: len(cdata) - len(cdata) % a.itemsize])
                fds.extend(a)
        buf += data
    return buf


def serve(conn, vram_size):
    config = struct.pack("<IIQII", 0x474D4D48, 1, vram_size, 4096, 4096)
    while True:
        fds = []
        hdr = recv_exact(conn, 12, fds)
        if hdr is None:
            return
        req, flags, size = struct.unpack("<III", hdr)
        payload = recv_exact(conn, size, fds) if size else b""
        for fd in fds:
            os.close(fd)
        print(f"dummy-backend: {NAMES.get(req, req)} ({size} bytes, {len(fds)} fds)",
              file=sys.stderr, flush=True)
        if req in (GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM):
            value = {GET_FEATURES: FEATURES, GET_PROTOCOL_FEATURES: PROTOCOL_FEATURES,
                     GET_QUEUE_NUM: 1}[req]
            reply = struct.pack("<Q", value)
        elif req == GET_VRING_BASE:
            reply = payload[:4] + struct.pack("<I", 0)
        elif req == GET_CONFIG:
            offset, length, cflags = struct.unpack("<III", payload[:12])
            data = config[offset:offset + length].ljust(length, b"\0")
            reply = payload[:12] + data + payload[12 + length:]
        else:
            continue
        conn.sendall(struct.pack("<III", req, VERSION | REPLY, len(reply)) + reply)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--vram-size", required=True, type=parse_size)
    args = ap.parse_args()
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(args.socket)
    srv.listen(1)
    print(f"dummy-backend: listening on {args.socket}, vram {args.vram_size} bytes",
          file=sys.stderr, flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            serve(conn, args.vram_size)
        print("dummy-backend: connection closed", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
