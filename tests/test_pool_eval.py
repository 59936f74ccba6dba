"""The alarm-timing evaluation: delays from the scripted stop, misses and alarms not due."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from gateway.analyzers.pool_eval import Outcome, replay, table

ROOT = Path(__file__).resolve().parents[1]
CLIP = Path(str(resources.files("gateway.demo").joinpath("pool-demo.mp4")))


def test_delays_and_table() -> None:
    outcomes = [
        Outcome("still", "still", 5.0, (15.0,), (20.0,)),
        Outcome("still-1", "still", 5.0, (), ()),
        Outcome("swimmer", "swimmer", None, (), ()),
        Outcome("swimmer-1", "swimmer", None, (30.0,), (35.0,)),
    ]
    assert outcomes[0].delay(outcomes[0].alarms) == 15.0
    assert outcomes[1].delay(outcomes[1].alarms) is None
    assert outcomes[2].delay(outcomes[2].alarms) is None
    text = table(outcomes)
    assert "| still | 2 | yes | 10.00 | 15.00 | 1 | - |" in text
    assert "| swimmer | 2 | no | - | - | - | 1 |" in text


async def test_replay_of_the_demo_clip_times_the_still_swimmer() -> None:
    history = await replay(CLIP, ROOT / "models" / "generic" / "fastestdet" / "fastestdet.toml")
    kinds = [kind for _t, kind, _track in history]
    assert kinds == ["candidate", "alarm"]
    (t_candidate, _, _), (t_alarm, _, _) = history
    assert t_alarm - t_candidate == 5.0
    assert 12.0 <= t_candidate <= 14.0  # the person stops at 3.0 s of the clip
