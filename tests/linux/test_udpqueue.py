"""Datagrams waiting in another process's UDP socket are read without taking them and given
back from their sender's address; a TCP connection closed quietly tells its peer nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from orthros_py.net.quietclose import repaired_sockets
from orthros_py.net.udpqueue import Datagram, capture, give_back

HOLDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
time.sleep(60)
"""


def test_waiting_datagrams_are_read_in_place_and_given_back() -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind(("127.0.0.1", 0))
        for i in range(5):
            sender.sendto(f"beat {i}".encode(), ("127.0.0.1", port))
        time.sleep(0.05)
        got = capture([proc.pid])
        assert [d.payload for d in got] == [f"beat {i}".encode() for i in range(5)]
        assert all(d.remote == sender.getsockname() and d.local == ("127.0.0.1", port)
                   for d in got)
        assert capture([proc.pid]) == got, "reading took datagrams from the queue"
        # Given back to a socket at the same address, they come from the original sender.
        proc.kill()
        proc.wait()
        sender.close()
        again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        again.bind(("127.0.0.1", port))
        again.settimeout(2)
        assert give_back(got) == 5
        received = [again.recvfrom(64) for _ in range(5)]
        assert [r[0] for r in received] == [d.payload for d in got]
        assert {r[1] for r in received} == {got[0].remote}
        again.close()
    finally:
        proc.kill()
        proc.wait()
    assert Datagram.from_dict(got[0].to_dict()) == got[0]


TCP_HOLDER = """
import socket, sys, time
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.sendall(b"x")
print("up", flush=True)
time.sleep(60)
"""


def test_a_connection_closed_quietly_leaves_its_peer_waiting() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    outcomes = {}
    for quiet in (True, False):
        proc = subprocess.Popen([sys.executable, "-c", TCP_HOLDER, str(srv.getsockname()[1])],
                                stdout=subprocess.PIPE, text=True)
        peer, _ = srv.accept()
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
            assert peer.recv(1) == b"x"
            if quiet:
                with repaired_sockets([proc.pid]) as n:
                    assert n == 1
                    proc.kill()
                    proc.wait()
            else:
                proc.kill()  # the control: a plain kill closes the connection (FIN)
                proc.wait()
            peer.settimeout(0.5)
            try:
                outcomes[quiet] = "eof" if peer.recv(1) == b"" else "data"
            except TimeoutError:
                outcomes[quiet] = "silent"
            except ConnectionResetError:
                outcomes[quiet] = "reset"
        finally:
            proc.kill()
            proc.wait()
            peer.close()
    srv.close()
    assert outcomes == {True: "silent", False: "eof"}, outcomes
