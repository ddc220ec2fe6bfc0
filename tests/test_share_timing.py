"""Timing of wrong share tokens (issue 6): a token wrong only in its first character and one
wrong only in its last are refused in the same time, so timing tells a guesser nothing about
which part of a token was right. Measured on `Shares.open` over a real SQLite index."""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from storage.index import Index
from storage.shares import MISSES_AFTER, ShareNotFound, Shares

# The alphabet of `secrets.token_urlsafe`: a token changed within it stays well formed, so
# it is looked up, not refused by its shape.
TOKEN_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
PAIRS = 6000
WARM_UP = 200
# How far, in standard errors of a fair coin, the fraction below may stray from one half:
# about one run in 150,000 fails by chance. A lookup that takes from about 3.5 us longer
# for the token right up to its last character (0.5% of a refusal, which takes 0.7 ms)
# fails it; under 1 us is lost in the noise of 6,000 pairs (docs/reliability.md).
LIMIT_SE = 4.5


def other_character(character: str) -> str:
    return TOKEN_ALPHABET[(TOKEN_ALPHABET.index(character) + 1) % len(TOKEN_ALPHABET)]


def address(number: int) -> str:
    """The `number`th address of 10.0.0.0/8."""
    return f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}"


@dataclass(frozen=True)
class Timings:
    """Nanoseconds to refuse each of the two wrong tokens, pair by pair."""

    first_wrong: list[int]
    last_wrong: list[int]

    def first_faster(self) -> float:
        """The fraction of pairs in which the token wrong in its first character was refused
        faster (a tie counts half): one half when timing says nothing."""
        pairs = zip(self.first_wrong, self.last_wrong, strict=True)
        score = sum(1.0 if a < b else 0.5 if a == b else 0.0 for a, b in pairs)
        return score / len(self.first_wrong)

    def limit(self) -> float:
        return LIMIT_SE * 0.5 / math.sqrt(len(self.first_wrong))

    def summary(self) -> str:
        first, last = (statistics.quantiles(t, n=4) for t in (self.first_wrong, self.last_wrong))
        return (
            f"first-wrong faster in {self.first_faster():.4f} of {len(self.first_wrong)} pairs "
            f"(limit 0.5 ± {self.limit():.4f}); medians {first[1] / 1e3:.1f} and "
            f"{last[1] / 1e3:.1f} us, interquartile range {(first[2] - first[0]) / 1e3:.1f} us"
        )


def refusal_times(shares: Shares, token: str, pairs: int = PAIRS, seed: int = 6) -> Timings:
    """Time `Shares.open` on the token changed in its first and in its last character, back
    to back in random order (so load on the machine falls on both alike), each pair from an
    address of its own (so the lockout after `MISSES_AFTER` misses never starts)."""
    assert MISSES_AFTER > 2
    wrong = {"first": other_character(token[0]) + token[1:]}
    wrong["last"] = token[:-1] + other_character(token[-1])
    order = random.Random(seed)
    times: dict[str, list[int]] = {"first": [], "last": []}
    for number in range(-WARM_UP, pairs):
        kinds = ["first", "last"]
        order.shuffle(kinds)
        for kind in kinds:
            started = time.perf_counter_ns()
            try:
                shares.open(wrong[kind], address(number + WARM_UP))
            except ShareNotFound:
                elapsed = time.perf_counter_ns() - started
            else:
                raise AssertionError(f"a token wrong in its {kind} character opened the link")
            if number >= 0:
                times[kind].append(elapsed)
    return Timings(times["first"], times["last"])


def test_a_wrong_first_or_last_character_takes_the_same_time(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    index.migrate()
    try:
        shares = Shares(index)
        token = shares.create("1.2.826.0.1.3680043.2.1143.6", "north", "staff").token
        link, _ = shares.open(token, "203.0.113.9")  # the right token opens the link
        assert link.study_instance_uid == "1.2.826.0.1.3680043.2.1143.6"
        timings = refusal_times(shares, token)
        assert abs(timings.first_faster() - 0.5) < timings.limit(), timings.summary()
    finally:
        index.dispose()
