"""The memory workload's pure parts: the page pattern, versions, VERIFY on a small buffer, a
corrupted page found, the server's answers, and what a PING client's log says (gaps, first reply
after an instant, errors per connection). The in-process server on loopback needs no root."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from orthros_py.workloads.memhog import (
    PAGE,
    ClientError,
    ClientLog,
    MemClient,
    MemConn,
    MemHog,
    Region,
    Reply,
    VerifyResult,
    Worker,
    hot_page,
    hot_pages,
    mix,
    page_bytes,
    parse_ready,
    read_header,
    serve,
    tcp,
    wait_ready,
)


def region(pages: int = 600, seed: int = 7) -> Region:
    r = Region(bytearray(pages * PAGE), seed)
    r.fill()
    return r


def test_page_pattern_depends_on_seed_page_and_version() -> None:
    a = page_bytes(1, 5, 0)
    assert len(a) == PAGE
    assert a[:16] * 256 == a
    assert read_header(a)[:2] == (5, 0)
    others = {page_bytes(2, 5, 0), page_bytes(1, 6, 0), page_bytes(1, 5, 1)}
    assert a not in others and len(others) == 3
    assert mix(1, 5, 0) != mix(1, 5, 1)


def test_fill_then_verify_is_ok_and_covers_every_page() -> None:
    r = region(600)  # not a multiple of the chunk: the last chunk is short
    assert r.verify() == VerifyResult(600)
    assert r.verify().line() == "OK 600"
    for p in (0, 255, 256, 599):
        assert r.check(p)
        assert read_header(bytes(r.buf[p * PAGE:p * PAGE + 16])) == (p, 0)


def test_buffer_must_be_whole_pages() -> None:
    with pytest.raises(ValueError):
        Region(bytearray(PAGE + 1))


def test_bump_writes_the_next_version() -> None:
    r = region(10)
    r.bump(3)
    r.bump(3)
    assert r.versions[3] == 2
    assert r.check(3)
    assert bytes(r.buf[3 * PAGE:4 * PAGE]) == page_bytes(r.seed, 3, 2)
    assert r.versions_sum() == 2
    assert r.verify().ok


@pytest.mark.parametrize("offset", [0, 17, PAGE - 1])
def test_one_corrupted_byte_is_found(offset: int) -> None:
    r = region(600)
    r.buf[300 * PAGE + offset] ^= 0xFF
    r.buf[512 * PAGE + offset] ^= 0x01
    res = r.verify()
    assert (res.bad, res.first_bad, res.ok) == (2, 300, False)
    assert res.line() == "BAD 2 300"
    assert not r.check(300)


def test_a_stale_version_is_a_mismatch() -> None:
    """A page that migrated from before the last write holds the old version: wrong."""
    r = region(8)
    old = bytes(r.buf[2 * PAGE:3 * PAGE])
    r.bump(2)
    r.buf[2 * PAGE:3 * PAGE] = old
    assert r.verify() == VerifyResult(8, 1, 2)


def test_a_page_copied_to_the_wrong_place_is_a_mismatch() -> None:
    r = region(8)
    r.buf[4 * PAGE:5 * PAGE] = bytes(r.buf[5 * PAGE:6 * PAGE])
    assert r.verify().first_bad == 4


def test_verify_result_parses_both_answers() -> None:
    assert VerifyResult.parse("OK 12") == VerifyResult(12)
    bad = VerifyResult.parse("BAD 3 9")
    assert (bad.ok, bad.bad, bad.first_bad) == (False, 3, 9)
    with pytest.raises(ValueError):
        VerifyResult.parse("PONG 1")


def test_hot_set_sizes_and_layouts() -> None:
    assert hot_pages(1000, 0.3) == 300
    assert hot_pages(1000, 0.0) == 0
    assert hot_pages(10, 0.01) == 1  # a fraction above 0 has at least one page
    assert hot_pages(10, 1.0) == 10
    with pytest.raises(ValueError):
        hot_pages(10, 1.5)
    with pytest.raises(ValueError):
        hot_pages(10, 0.5, "middle")
    assert [hot_page(i, 1000, 300, "first") for i in (0, 299)] == [0, 299]
    spread = [hot_page(i, 1000, 250, "spread") for i in range(250)]
    assert spread[:3] == [0, 4, 8] and spread[-1] == 996 and len(set(spread)) == 250


def test_worker_writes_only_hot_pages_and_counts_mismatches() -> None:
    r = region(100)
    w = Worker(r, 10, rate=0)
    for _ in range(500):
        w.step()
    assert w.stats.steps == w.stats.writes == 500
    assert w.stats.mismatches == 0
    assert r.versions_sum() == 500
    assert all(v == 0 for v in r.versions[10:])
    assert r.verify().ok
    r.buf[3 * PAGE] ^= 0xFF  # a hot page goes bad behind the worker's back
    for _ in range(2000):
        w.step()
    assert w.stats.mismatches == 1 and w.stats.first_mismatch == 3


def test_read_only_worker_never_writes() -> None:
    r = region(50)
    w = Worker(r, 50, rate=0, read_only=True, layout="spread")
    for _ in range(200):
        w.step()
    assert w.stats.writes == 0 and r.versions_sum() == 0 and w.stats.mismatches == 0


def test_rate_limited_worker_thread_starts_and_stops() -> None:
    r = region(64)
    w = Worker(r, 16, rate=1000).start()
    time.sleep(0.1)
    w.stop()
    assert not w.thread.is_alive()
    assert w.stats.steps > 0
    assert r.verify().ok


def test_answers() -> None:
    r = region(20)
    hog = MemHog(r, Worker(r, 5, rate=0), hot_fraction=0.25)
    assert hog.answer("PING") == "PONG 1"
    assert hog.answer("ping") == "PONG 2"
    st = json.loads(hog.answer("STAT"))
    assert st["pages"] == 20 and st["hot_pages"] == 5 and st["mismatches"] == 0
    assert st["pings"] == 2 and st["addr"] is None
    assert hog.answer("VERIFY") == "OK 20"
    assert hog.answer("TOUCH 5 50") == "OK 15"
    assert hog.answer("TOUCH x").startswith("ERR")
    assert hog.answer("").startswith("ERR")
    assert hog.answer("FLY").startswith("ERR unknown")
    r.buf[7 * PAGE] ^= 1
    assert hog.answer("VERIFY") == "BAD 1 7"
    assert json.loads(hog.answer("STAT"))["last_verify"] == "BAD 1 7"


def test_ready_line() -> None:
    assert parse_ready("READY 123 4567") == (123, 4567)
    assert parse_ready("READY x 1") is None
    assert parse_ready("hello") is None


def test_wait_ready_reads_the_log(tmp_path: object) -> None:
    from pathlib import Path

    log = Path(str(tmp_path)) / "hog.out"
    log.write_text("filling\nREADY 9 80\n")
    assert wait_ready(log, timeout=1) == (9, 80)
    log.write_text("Traceback: boom\n")
    with pytest.raises(TimeoutError, match="exited"):
        wait_ready(log, timeout=5, alive=lambda: False)


# --- the client's log -------------------------------------------------------------------------------


def log_of(pairs: list[tuple[float, float]], conn: int = 0) -> ClientLog:
    return ClientLog([Reply(s, g, conn) for s, g in pairs])


def test_longest_gap_between_replies() -> None:
    log = log_of([(0.0, 0.01), (0.1, 0.11), (0.2, 1.5), (1.5, 1.51), (1.6, 1.61)])
    assert log.longest_gap() == pytest.approx(1.39)
    # A window cuts the replies and counts its edges: no reply from 2.0 to 5.0 is a 3.39 s gap.
    assert log.longest_gap(1.0, 5.0) == pytest.approx(5.0 - 1.61)
    assert log.longest_gap(0.0, 1.2) == pytest.approx(1.2 - 0.11)
    assert ClientLog().longest_gap() is None
    assert ClientLog().longest_gap(1.0, 3.0) == pytest.approx(2.0)


def test_time_to_first_reply_counts_only_requests_sent_after() -> None:
    # The PING sent at 0.95 is answered at 1.02 (before the freeze took hold): it does not
    # count as an answer to a request made after the lock at 1.0.
    log = log_of([(0.9, 0.91), (0.95, 1.02), (1.01, 2.4), (2.41, 2.42)])
    assert log.first_reply_after(1.0) == pytest.approx(2.4)
    assert log.time_to_first_reply(1.0) == pytest.approx(1.4)
    assert log.time_to_first_reply(3.0) is None
    assert log.max_latency(1.0, 3.0) == pytest.approx(1.39)
    assert log.max_latency(5.0, 6.0) is None


def test_errors_per_connection_and_window() -> None:
    log = ClientLog([Reply(0, 0.1, 0), Reply(2, 2.1, 1)],
                    [ClientError(1.0, 0, "reset"), ClientError(1.5, 1, "timeout"),
                     ClientError(1.6, 1, "timeout")], connections=2)
    assert log.errors_per_connection() == {0: 1, 1: 2}
    w = log.window(1.2, 3.0)
    assert [e.what for e in w.errors] == ["timeout", "timeout"]
    assert [r.conn for r in w.replies] == [1]


# --- the real server on loopback --------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    r = region(64)
    w = Worker(r, 16, rate=500).start()
    srv = serve(MemHog(r, w, hot_fraction=0.25), "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield "127.0.0.1", int(srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()
        w.stop()


def test_conn_and_client_against_a_server(server: tuple[str, int]) -> None:
    with MemConn(tcp(server)) as c:
        assert c.ping() >= 1
        assert c.stat()["pages"] == 64
        assert c.verify().ok
        assert c.touch(0, 64) == 64
    client = MemClient(tcp(server), rate=200).start()
    time.sleep(0.2)
    log = client.stop()
    assert len(log.replies) >= 5 and log.errors == [] and log.connections == 1
    assert all(r.got >= r.sent for r in log.replies)


def test_client_records_a_reset_and_reconnects(server: tuple[str, int]) -> None:
    socks: list[socket.socket] = []

    def connect() -> socket.socket:
        s = socket.create_connection(server, timeout=5)
        socks.append(s)
        return s

    client = MemClient(connect, rate=200).start()
    time.sleep(0.1)
    socks[0].shutdown(socket.SHUT_RDWR)  # the connection dies under the client
    time.sleep(0.2)
    log = client.stop()
    assert log.connections >= 2
    assert log.errors and log.errors[0].conn == 0
    assert any(r.conn >= 1 for r in log.replies)
