"""Measuring CRIU's lock time from its own timestamped log."""

from __future__ import annotations

import pytest

from orthros_py.criu.log import lock_spans

LOG = """\
(00.100000) Dumping sockets
(00.200000) 	Running iptables [iptables -w -I INPUT -s 10.0.0.1 ...]
(00.215000) Locked 10.0.0.1:80 - 10.0.0.2:5000 connection
(00.215100) 	Running iptables [iptables -w -I OUTPUT -s 10.0.0.2 ...]
(00.231100) Locked 10.0.0.2:5000 - 10.0.0.1:80 connection
(00.300000) Dumping finished successfully
"""


def test_sums_each_fork() -> None:
    spans = lock_spans(LOG.splitlines())
    assert spans.tool == "iptables"
    assert spans.calls == 2
    assert spans.total_ms == pytest.approx(31.0, abs=1e-6)


def test_restore_log_with_pid_prefix_and_untimed_lines() -> None:
    lines = ["(01.000000)  4242: \tRunning nftables [add element ...]",
             "a line without a timestamp",
             "(01.002500)  4242: next"]
    spans = lock_spans(lines)
    assert (spans.tool, spans.calls) == ("nftables", 1)
    assert spans.total_ms == pytest.approx(2.5)


def test_no_locking() -> None:
    spans = lock_spans(["(00.000001) Version: 4.2.1"])
    assert (spans.tool, spans.calls, spans.total_ms) == (None, 0, 0.0)


def test_timestamps_past_100_s_lose_a_digit_but_parse() -> None:
    spans = lock_spans(["(100.00000) Running iptables [x]", "(100.10000) done"])
    assert spans.total_ms == pytest.approx(100.0)
