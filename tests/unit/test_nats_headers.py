"""jetpipe's NATS connections read message headers with their own parser (pipeline/infra/taskqueue.py,
`_Client`): it must read every header block exactly as nats-py's own does."""

from __future__ import annotations

import random

import nats.aio.client

from pipeline.infra.taskqueue import _Client

ODD = [
    b"", b"\r\n", b"Nats-Msg-Id: 5:17\r\nPipeline-Job-Id: 5\r\nPipeline-Image-Id: 17\r\n\r\n",
    b"Name:Value\r\nName2:\tValue2\r\nName3 : spaced \r\n", b"no colon here\r\nA: b\r\n",
    b"Bad Name: x\r\nTab\tName: y\r\nFS\x1cName: z\r\nGood: w\r\n", "Ünïcode: v\r\nOk: ü\r\n".encode(),
    b"Broken: \xff\xfe utf-8\r\n", b"Dup: 1\r\nDup: 2\r\n", b": empty name\r\nEmpty:\r\n", b"A: b:c:d\r\n",
    b"Pipeline-Task-Reply: $JS.ACK.s.c.1.2.3.4.5,$JS.ACK.s.c.1.2.3.4.6\r\ntraceparent: 00-ab-cd-01\r\n",
]


def test_the_header_parser_reads_every_block_as_nats_py_does():
    original, ours = nats.aio.client.Client._parse_header_lines, _Client._parse_header_lines
    assert ours is not original
    for raw in ODD:
        assert ours(raw) == original(raw), raw
    # every ASCII character in a name, and random blocks of the bytes that matter
    for code in range(128):
        raw = b"Na" + bytes([code]) + b"me: v\r\n"
        assert ours(raw) == original(raw), raw
    rng = random.Random(27)
    alphabet = b"ab: \t\r\n\x0b\x0c\x1c\x1f\xc3\xbc\xff-"
    for _ in range(20_000):
        raw = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert ours(raw) == original(raw), raw
