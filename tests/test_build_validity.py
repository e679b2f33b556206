"""build._Validity: which outputs the local store holds already, one Nix query per batch."""

from __future__ import annotations

import asyncio

from runner.build import _Validity
from tests.test_nix import MISSING, store_file


def test_one_batch_answers_every_node_that_asks_together():
    path = store_file("waggle-validity")

    async def ask() -> list[bool]:
        validity = _Validity()
        return list(await asyncio.gather(validity.valid(path), validity.valid(MISSING)))

    assert asyncio.run(ask()) == [True, False]


def test_nix_failing_counts_as_not_valid():
    path = store_file("waggle-validity")

    async def ask() -> list[bool]:
        validity = _Validity()
        return list(await asyncio.gather(validity.valid(path), validity.valid("/not/in/store")))

    assert asyncio.run(ask()) == [False, False]
