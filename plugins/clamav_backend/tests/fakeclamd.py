"""An impostor clamd for the tests: answers PING and VERSION as clamd does and ``OK`` to every scan.

Usage: ``python fakeclamd.py unix PATH`` or ``python fakeclamd.py tcp PORT``; prints ``ready`` once it
listens. The tests run it as ``nobody``, as a local attacker would, to show its verdicts are refused.
Standard library only: it runs with whatever Python the test starts.
"""

import os
import socket
import struct
import sys
import threading


def _read_exact(conn, size):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("short read")
        data += chunk
    return data


def _serve(conn):
    with conn:
        command = b""
        while not command.endswith(b"\0"):
            chunk = conn.recv(1)
            if not chunk:
                return
            command += chunk
        name = command[1:-1].split(b" ", 1)[0]
        if name == b"PING":
            conn.sendall(b"PONG\0")
        elif name == b"VERSION":
            conn.sendall(b"ClamAV 1.4.6/27400/Tue Dec  2 09:00:00 2025\0")
        elif name == b"INSTREAM":
            while True:
                (size,) = struct.unpack("!L", _read_exact(conn, 4))
                if not size:
                    break
                _read_exact(conn, size)
            conn.sendall(b"stream: OK\0")
        elif name == b"FILDES":
            conn.recvmsg(1, socket.CMSG_SPACE(4))
            conn.sendall(b"fd[9]: OK\0")
        else:
            path = command[1:-1].split(b" ", 1)[-1]
            conn.sendall(path + b": OK\0")


def main():
    kind, where = sys.argv[1], sys.argv[2]
    if kind == "unix":
        server = socket.socket(socket.AF_UNIX)
        server.bind(where)
    else:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", int(where)))
    server.listen(64)
    print("ready", os.getuid(), flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
