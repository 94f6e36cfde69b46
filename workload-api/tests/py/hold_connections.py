"""Opens N connections to a Unix socket, sends nothing, and holds them: the hostile local
user of the Workload API socket. Prints {"opened": k} once they are open, then after
HOLD_SECONDS (or when every one was closed) {"opened": k, "closed": c, "data": d}: `closed`
counts connections the server closed, `data` those on which the server wrote something
(its HTTP/2 SETTINGS: the ones it admitted).

usage: hold_connections.py SOCKET N HOLD_SECONDS
"""

import json
import select
import socket
import sys
import time


def main():
    path, n, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    socks = {}
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            socks[s.fileno()] = s
        except OSError:
            s.close()
    opened = len(socks)
    print(json.dumps({"opened": opened}), flush=True)
    closed, data = set(), set()
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline and len(closed) < opened:
        live = [s for fd, s in socks.items() if fd not in closed]
        ready, _, _ = select.select(live, [], [], 0.2)
        for s in ready:
            try:
                got = s.recv(65536)
            except OSError:
                got = b""
            if got:
                data.add(s.fileno())
            else:
                closed.add(s.fileno())
    print(json.dumps({"opened": opened, "closed": len(closed), "data": len(data)}), flush=True)


if __name__ == "__main__":
    main()
