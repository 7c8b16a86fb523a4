"""Domains and the schedule: parsing, lookup, blending, errors."""
from __future__ import annotations

import pytest

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.domains import (
    DRIFTED,
    SOURCE,
    Domain,
    DomainSchedule,
    Segment,
    domain_names,
    get_domain,
)


def test_builtin_domains() -> None:
    assert [SOURCE, *DRIFTED] == domain_names()[:5]
    assert get_domain(SOURCE).shifts == ()
    for name in DRIFTED:
        assert get_domain(name).shifts, name


@pytest.mark.parametrize('kwargs, match', [
    ({'name': 'a:b'}, 'a:b'),
    ({'name': 'x', 'shifts': (('nope', 0.5),)}, 'nope'),
    ({'name': 'x', 'shifts': (('fog', 1.5),)}, '1.5'),
    ({'name': 'x', 'shifts': (('fog', 0.2), ('fog', 0.3))}, 'twice'),
])
def test_domain_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Domain(**kwargs)


def test_blend_interpolates_strengths() -> None:
    fog, night = get_domain('fog'), get_domain('night')
    mid = fog.blend(night, 0.25)
    assert mid.strength('fog') == pytest.approx(0.75 * fog.strength('fog'))
    assert mid.strength('dark') == pytest.approx(0.25 * night.strength('dark'))
    assert fog.blend(night, 0.0) is fog and fog.blend(night, 1.0) is night
    with pytest.raises(ConfigError):
        fog.blend(night, 1.2)


@pytest.mark.parametrize('position, name', [
    (0.0, 'source'), (29.9, 'source'), (30.0, 'fog'), (65.0, 'night'), (89.99, 'night'),
    (90.0, 'source'), (125.0, 'fog'),  # loops by default
])
def test_schedule_lookup(position: float, name: str) -> None:
    schedule = DomainSchedule.parse('source:30,fog:30,night:30')
    assert schedule.total == 90.0 and schedule.unit == 's'
    assert schedule.name_at(position) == name
    assert schedule.domain_at(position).name == name


def test_schedule_options_and_hold() -> None:
    schedule = DomainSchedule.parse(' source : 100 , novel:50 ;unit=frames; loop=false ')
    assert schedule.segments == (Segment('source', 100.0), Segment('novel', 50.0))
    assert schedule.unit == 'frames' and not schedule.loop
    assert schedule.name_at(1000) == 'novel'
    assert schedule.position(120, seconds=3.0) == 120.0
    assert DomainSchedule.parse(str(schedule)) == schedule


def test_schedule_blend() -> None:
    schedule = DomainSchedule.parse('source:10,fog:10;blend=4')
    assert schedule.weights_at(2.0) == ('source', 'source', 1.0)  # first pass: nothing before
    assert schedule.weights_at(11.0) == ('source', 'fog', 0.25)
    assert schedule.domain_at(11.0).strength('fog') == pytest.approx(
        0.25 * get_domain('fog').strength('fog'))
    assert schedule.domain_at(15.0).name == 'fog'
    assert schedule.weights_at(21.0) == ('fog', 'source', 0.25)  # after the loop


@pytest.mark.parametrize('text', [
    '', 'source', 'source:', 'source:abc', 'mars:10', 'source:0', 'source:-5', 'source:inf',
    ':10', 'source:10;unit=hours', 'source:10;blend=10', 'source:10;blend=x',
    'source:10;loop=maybe', 'source:10;speed=2', 'source:10;blend', 'source:10,,fog:5',
])
def test_schedule_bad_strings_raise(text: str) -> None:
    with pytest.raises(ConfigError):
        DomainSchedule.parse(text)


@pytest.mark.parametrize('position', [-1.0, float('nan'), float('inf')])
def test_schedule_bad_positions(position: float) -> None:
    with pytest.raises(ConfigError):
        DomainSchedule.parse('source:1').name_at(position)


def test_seconds_schedule_needs_seconds() -> None:
    with pytest.raises(ConfigError, match='seconds'):
        DomainSchedule.parse('source:1').position(3)
