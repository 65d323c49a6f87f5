"""Per-node socket interfaces and the one line for a lost peer (pipeline/distributed.py)."""

import pytest
from hiervl import distributed as D
from hiervl.config import ConfigError
from hiervl.launch import deepspeed_launch as ds

PEERS = [{"rank": 0, "host": "n1", "addr": "10.77.0.1"}, {"rank": 1, "host": "n2", "addr": "10.77.0.2"},
         {"rank": 2, "host": "n3", "addr": "10.77.0.3"}]


def test_interface_per_node():
    assert D.socket_ifname("auto", "127.0.0.1") is None  # one machine: leave loopback alone
    assert D.socket_ifname("auto", None) is None
    assert D.socket_ifname("eth9", "10.0.0.1") == "eth9"
    assert D.socket_ifname("n1:eno1,n2:ens5", "n1", hostname="n2.cluster.local") == "ens5"
    assert D.socket_ifname("n1:eno1,n2:ens5", "n1", hostname="n1") == "eno1"
    with pytest.raises(ConfigError, match="no interface for this host n3; add n3:IFNAME"):
        D.socket_ifname("n1:eno1,n2:ens5", "n1", hostname="n3")


def test_auto_takes_the_route_to_the_master(monkeypatch):
    addr, name = D.route_to("127.0.0.1")
    assert addr == "127.0.0.1" and name == "lo"
    assert D.socket_ifname("auto", "127.0.0.1", multi_host=False) is None
    # the master's own name resolves to loopback (Debian's 127.0.1.1 line) on a multi-host run: the
    # interface other hosts reach it by, never lo
    out_addr, out_name = D.outward_interface()
    assert D.socket_ifname("auto", "127.0.0.1", multi_host=True) is None  # loopback named as such: one machine
    assert D.socket_ifname("auto", "localhost", multi_host=True) is None
    monkeypatch.setattr(D, "_is_loopback", lambda host: host == "n1")  # n1 maps to 127.0.1.1 on n1
    assert D.socket_ifname("auto", "n1", multi_host=True) == out_name and out_name != "lo"
    assert out_addr is None or D.interface_addr(out_name) == out_addr


def test_spans_hosts():
    assert D.spans_hosts({"WORLD_SIZE": "2", "LOCAL_SIZE": "1"})  # DeepSpeed's launcher, 2 nodes
    assert not D.spans_hosts({"WORLD_SIZE": "2", "LOCAL_SIZE": "2"})
    assert D.spans_hosts({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"})  # torchrun
    assert not D.spans_hosts({"WORLD_SIZE": "2"})  # unknown: one machine


def test_deepspeed_env_does_not_send_one_interface_to_every_node():
    text = ds.deepspeed_env_text({"GLOO_SOCKET_IFNAME": "eno1", "NCCL_SOCKET_IFNAME": "eno1", "DS_ACCELERATOR": "cpu"})
    assert text == "DS_ACCELERATOR=cpu\n"


def test_lost_peer_line_names_the_peer(monkeypatch):
    monkeypatch.setattr(D, "get_rank", lambda: 0)
    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv operation")
    line = D.failed_peer_line(timeout, PEERS[:2], 20, 7)
    assert line.startswith("a collective timed out at step 7 (train.dist_timeout_s=20): no answer from rank 1 on n2 "
                           "(10.77.0.2);"), line
    closed = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.77.0.3]:40112")
    line = D.failed_peer_line(closed, PEERS, 20, 3)
    assert "a collective failed at step 3" in line and "rank 2 on n3 (10.77.0.3)" in line and "n2" not in line.split(";")[0]
    assert D.failed_peer_line(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), PEERS, 20, 1) is None
    assert D.failed_peer_line(ValueError("Timed out"), PEERS, 20, 1) is None


def test_node_ranks_and_rank_errors(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=2\n# comment\nn2 slots=3\n")
    assert ds.node_ranks(hostfile, 0) == [0, 1] and ds.node_ranks(hostfile, 1) == [2, 3, 4]
    (tmp_path / "2026_rank2.log").write_text("noise\nhiervl train: error: lost n1\nhiervl train: error: lost n1\n")
    (tmp_path / "2026_rank0.log").write_text("hiervl train: error: lost n2\n")
    assert ds.rank_errors(tmp_path, [2, 3, 4], since=0) == ["hiervl train: error: lost n1"]
    assert ds.rank_errors(tmp_path, [2], since=(tmp_path / "2026_rank2.log").stat().st_mtime + 5) == []
