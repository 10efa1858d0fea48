"""Window packing properties: never over max_positions, exact accounting, order kept, long turns split,
speakers renumbered, nothing dropped silently."""

import random

import pytest

from schemas.config import TurnsConfig, WindowConfig
from schemas.records import Segment, Transcript, Turn, Word
from tasks.turns import make_turns
from tasks.windows import n_frames, pack_windows


def tokenize(speaker: int, text: str) -> list[int]:
    # Stand-in for a BPE tokenizer: one id per character of "[speaker]text" so counts vary with the text.
    return [ord(c) for c in f"[{speaker}]{text}"]


def random_turns(rng: random.Random, n: int, long_every: int = 0) -> list[Turn]:
    turns, t = [], 0.0
    for i in range(n):
        n_words = rng.randint(1, 400 if long_every and i % long_every == 0 else 25)
        words = []
        for _ in range(n_words):
            d = rng.uniform(0.1, 0.6)
            words.append(Word(text=rng.choice(["so", "well", "right", "podcast", "yes"]), start=t, end=t + d))
            t += d + rng.uniform(0.0, 0.2)
        turns.append(Turn(speaker=f"S{rng.randint(0, 3)}", start=words[0].start, end=words[-1].end,
                          text=" ".join(w.text for w in words), words=words, extra={"index": i}))
        t += rng.uniform(0.2, 1.0)
    return turns


@pytest.mark.parametrize("seed", range(20))
def test_packing_properties(seed: int) -> None:
    rng = random.Random(seed)
    cfg = WindowConfig(max_positions=rng.choice([256, 512, 2048]))
    turns = random_turns(rng, 60, long_every=7)
    windows, rejects = pack_windows("rec", "file:///rec.wav", turns, tokenize, cfg)
    assert windows and not rejects
    covered = []
    for i, w in enumerate(windows):
        assert w.window == i
        assert w.n_positions <= cfg.max_positions
        assert w.n_positions == sum(t.text_tokens + t.frames + 1 for t in w.turns)
        for t in w.turns:
            assert t.frames == n_frames(t.start, t.end)
            assert t.tokens == tokenize(t.speaker, t.text) and t.text_tokens == len(t.tokens)
        # speakers renumbered 0..k in order of first appearance inside the window
        order = list(dict.fromkeys(t.speaker for t in w.turns))
        assert order == list(range(len(order)))
        mapping = {t.source_speaker: t.speaker for t in w.turns}
        assert all(mapping[t.source_speaker] == t.speaker for t in w.turns)
        covered += [(t.start, t.end) for t in w.turns]
    # turn order kept, and every word of every turn lands in exactly one window turn
    assert covered == sorted(covered)
    assert sum(len(t.text.split()) for w in windows for t in w.turns) == sum(len(t.words) for t in turns)


def test_long_turn_is_split_at_word_boundaries() -> None:
    words = [Word(text=f"w{i}", start=i * 0.5, end=i * 0.5 + 0.4) for i in range(600)]  # 300 s, one speaker
    turn = Turn(speaker="A", start=0, end=words[-1].end, text=" ".join(w.text for w in words), words=words,
                extra={"index": 0})
    windows, rejects = pack_windows("rec", "src", [turn], tokenize, WindowConfig())
    assert not rejects and len(windows) >= 2
    texts = [t.text for w in windows for t in w.turns]
    assert " ".join(texts).split() == [w.text for w in words]
    assert all(w.n_positions <= 2048 for w in windows)


def test_unsplittable_turn_is_rejected_with_reason() -> None:
    word = Word(text="aaaa", start=0.0, end=200.0)  # one 200 s "word": 2500 frames, cannot fit
    turn = Turn(speaker="A", start=0, end=200, text="aaaa", words=[word], extra={"index": 0})
    ok = Turn(speaker="B", start=201, end=203, text="hi there",
              words=[Word(text="hi", start=201, end=202), Word(text="there", start=202, end=203)], extra={"index": 1})
    windows, rejects = pack_windows("rec", "src", [turn, ok], tokenize, WindowConfig())
    assert len(rejects) == 1 and rejects[0].stage == "windows" and rejects[0].seconds == 200
    assert "cannot be split" in rejects[0].reason
    assert [t.text for w in windows for t in w.turns] == ["hi there"]
    assert windows[0].turns[0].speaker == 0  # renumbered inside its own window


def test_window_never_joins_turns_across_a_rejected_one() -> None:
    turns = random_turns(random.Random(1), 3)
    turns[2].extra["index"] = 5  # turns 2..4 were rejected by the quality gate
    windows, _ = pack_windows("rec", "src", turns, tokenize, WindowConfig())
    assert [len(w.turns) for w in windows] == [2, 1]


def test_frames_round_up() -> None:
    assert n_frames(0.0, 0.08) == 1
    assert n_frames(0.0, 0.081) == 2
    assert n_frames(1.0, 3.0) == 25
    assert n_frames(0.5, 0.5) == 1


def test_turns_split_on_speaker_change_and_long_pause() -> None:
    words = [Word(text="a", start=0, end=0.5, speaker="S1"), Word(text="b", start=0.6, end=1.0, speaker="S1"),
             Word(text="c", start=1.1, end=1.5, speaker="S2"), Word(text="d", start=5.0, end=5.5, speaker="S2"),
             Word(text="e", start=5.6, end=6.0, speaker=None)]
    transcript = Transcript(language="en", segments=[Segment(start=0, end=6, text="a b c d e", words=words)])
    turns = make_turns(transcript, overlaps=[(1.2, 1.4)], cfg=TurnsConfig(max_pause_s=1.5))
    assert [(t.speaker, t.text) for t in turns] == [("S1", "a b"), ("S2", "c"), ("S2", "d e")]
    assert [t.overlap for t in turns] == [False, True, False]
