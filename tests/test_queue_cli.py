"""`odmr-bridge queue ...`: postcat, postsuper -d/-h/-H/-r and qshape habits."""

from __future__ import annotations

import redis

from odmr_bridge.index import IndexedMessage
from odmr_bridge.queue_tools import summary
from tests.conftest import CUSTOMER
from tests.peers import Bridge, wait_for
from tests.wire import CustomerMta, Wire, lmtp_send

BODY = b"Subject: shown\r\n\r\n.dot line\r\n"


def test_show_prints_envelope_states_and_content(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example", "b@atrn.example"], BODY,
              rcpt_options="NOTIFY=FAILURE")
    [msg] = bridge.held()
    out = bridge.cli("queue", "show", msg["queue_id"]).stdout
    assert f"*** ENVELOPE RECORDS {msg['queue_id']} ***" in out
    assert "sender: s@x.test" in out
    assert "recipient: a@atrn.example NOTIFY=FAILURE [pending]" in out
    # (the CLI helper reads text, so CRLF arrives as LF)
    assert out.endswith(BODY.decode().replace("\r\n", "\n") + "*** END OF MESSAGE ***\n")


def test_unknown_or_malformed_ids_get_a_clear_error(bridge: Bridge) -> None:
    for qid, text in (("25XQYNF0NHQW54RM", "no such message"), ("../etc", "not a queue ID")):
        for action in ("show", "delete"):
            result = bridge.cli("queue", action, qid, check=False)
            assert result.returncode == 1 and text in result.stderr, (action, result.stderr)


def test_delete_removes_from_spool_and_index(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
    lmtp_send(bridge.lmtp_port, "s@x.test", ["c@second.example"], BODY)
    lmtp_send(bridge.lmtp_port, "s@x.test", ["d@second.example"], BODY)
    first = bridge.held("atrn.example")[0]["queue_id"]
    assert bridge.cli("queue", "delete", first).stdout == f"{first}: removed\n"
    assert bridge.held("atrn.example") == []
    assert not (bridge.spool / "deferred" / first).exists()
    out = bridge.cli("queue", "delete", "--domain", "second.example").stdout
    assert out.count(": removed") == 2
    assert bridge.held() == []


def test_delete_refuses_while_the_domain_is_being_collected(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 250
    result = bridge.cli("queue", "delete", "--domain", "atrn.example", check=False)
    assert result.returncode == 1 and "being collected" in result.stderr
    assert len(bridge.held("atrn.example")) == 1


def test_summary_counts_domains_by_age_like_qshape() -> None:
    now = 100_000.0
    messages = [IndexedMessage(f"Q{i}", d, now - age * 60, 10, "s", [])
                for i, (d, age) in enumerate([("a.example", 1), ("a.example", 30),
                                              ("b.example", 2000)])]
    lines = summary(messages, now=now).splitlines()
    assert lines[0].split() == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280",
                                "1280+"]
    assert lines[1].split() == ["TOTAL", "3", "1", "0", "0", "1", "0", "0", "0", "0", "0", "1"]
    assert lines[2].split() == ["a.example", "2", "1", "0", "0", "1", "0", "0", "0", "0", "0",
                                "0"]
    assert lines[3].split()[:2] == ["b.example", "1"]


def test_summary_command_runs_against_the_index(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
    out = bridge.cli("queue", "summary").stdout.splitlines()
    assert out[1].split()[:3] == ["TOTAL", "1", "1"]
    assert out[2].split()[:2] == ["atrn.example", "1"]


def collect(bridge: Bridge) -> list[tuple[str, list[str], bytes]]:
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    code, _ = w.command("ATRN atrn.example")
    if code != 250:
        w.close()
        return []
    return CustomerMta(w).run()


def test_a_message_on_hold_is_not_delivered_until_released(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
    lmtp_send(bridge.lmtp_port, "s@x.test", ["b@atrn.example"], BODY)
    first, second = (m["queue_id"] for m in bridge.held("atrn.example"))
    assert bridge.cli("queue", "hold", first).stdout == f"{first}: placed on hold\n"
    assert (bridge.spool / "hold" / first).exists()
    listing = bridge.cli("queue", "list").stdout
    assert f"{first}!" in listing and f"{second} " in listing  # postqueue's hold mark
    assert [m["queue_name"] for m in bridge.held()] == ["hold", "deferred"]
    assert [m[1] for m in collect(bridge)] == [["b@atrn.example"]]
    assert [m["queue_id"] for m in bridge.held()] == [first]
    assert bridge.cli("queue", "release", "--domain", "atrn.example").stdout == \
        f"{first}: released from hold\n"
    assert [m[1] for m in collect(bridge)] == [["a@atrn.example"]]
    assert bridge.held() == []
    log = bridge.log_text()
    assert f"{first}: to=<a@atrn.example>" in log and f"{first}: removed" in log


def test_hold_survives_a_lost_index(bridge: Bridge, redis_url: str) -> None:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
    [msg] = bridge.held()
    bridge.cli("queue", "hold", msg["queue_id"])
    redis.Redis.from_url(redis_url).flushall()
    bridge.cli("reindex")
    assert [(m["queue_id"], m["queue_name"]) for m in bridge.held()] == \
        [(msg["queue_id"], "hold")]


def test_requeue_gives_a_new_id_and_restarts_the_clock(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
    [old] = bridge.held()
    bridge.cli("queue", "hold", old["queue_id"])
    out = bridge.cli("queue", "requeue", old["queue_id"]).stdout
    assert out.startswith(f"{old['queue_id']}: requeued as ")
    new_id = out.split()[-1]
    [new] = bridge.held()
    assert (new["queue_id"], new["queue_name"]) == (new_id, "deferred")
    assert new["arrival_time"] > old["arrival_time"]
    assert not (bridge.spool / "hold" / old["queue_id"]).exists()
    assert bridge.cli("queue", "show", new_id).stdout.endswith(
        BODY.decode().replace("\r\n", "\n") + "*** END OF MESSAGE ***\n")


def test_state_changes_name_the_problem(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["a@atrn.example"], BODY)
    [msg] = bridge.held()
    qid = msg["queue_id"]
    result = bridge.cli("queue", "release", qid, check=False)
    assert result.returncode == 1 and f"{qid}: cannot release: the message is deferred" \
        in result.stderr
    for action in ("hold", "release", "requeue"):
        result = bridge.cli("queue", action, "25XQYNF0NHQW54RM", check=False)
        assert result.returncode == 1 and "no such message" in result.stderr
        result = bridge.cli("queue", action, check=False)
        assert result.returncode == 1 and f"nothing to {action}" in result.stderr
    # One bad ID in a list changes nothing.
    result = bridge.cli("queue", "hold", qid, "25XQYNF0NHQW54RM", check=False)
    assert result.returncode == 1 and bridge.held()[0]["queue_name"] == "deferred"


def test_notices_waiting_for_the_host_mta_are_listed_shown_and_deletable(bridge: Bridge) -> None:
    lmtp_send(bridge.lmtp_port, "s@x.test", ["gone@atrn.example"], BODY)
    [held] = bridge.held()
    w = Wire(bridge.odmr_port)
    w.login(*CUSTOMER)
    assert w.command("ATRN atrn.example")[0] == 250
    CustomerMta(w, {"gone@atrn.example": "550 5.1.1 unknown"}).run()
    # The fixture's bounce.relay does not answer: the bounce waits in bounce/.
    wait_for(lambda: bridge.held(notices=True) != [] and
             bridge.held(notices=True)[0]["queue_name"] == "bounce", what="the bounce listed")
    [notice] = bridge.held(notices=True)
    assert notice["sender"] == "" and notice["recipients"] == [
        {"address": "s@x.test", "state": "pending"}]
    assert "MAILER-DAEMON" in bridge.cli("queue", "list").stdout
    shown = bridge.cli("queue", "show", notice["queue_id"]).stdout
    assert "queue: bounce" in shown and f"notice_about: {held['queue_id']}" in shown
    assert "recipient: gone@atrn.example [failed] (550 5.1.1 unknown)" in shown
    result = bridge.cli("queue", "hold", notice["queue_id"], check=False)
    assert result.returncode == 1 and "is a notice to a sender" in result.stderr
    bridge.cli("queue", "delete", notice["queue_id"])
    assert bridge.held(notices=True) == []
