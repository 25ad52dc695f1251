"""Shared fixtures.

``mosquitto``: a real Mosquitto broker on a free loopback port (persistence on, so a clean restart keeps
sessions), stopped after the test; the test is skipped when the binary is absent (CI installs it with
``apt-get install -y mosquitto``). Use ``mosquitto.url``; ``mosquitto.stop()`` / ``.start()`` /
``.kill()`` / ``.restart()`` to break it. ``mosquitto_factory(**kw)`` makes more (TLS, passwords).

Every test starts with no trained-format expectation (``edge_ad.data.image``'s process-wide record of the
bit depth the running model was trained on): a Service whose model a test swaps without ``run()`` (which
puts the expectation back when it ends) would otherwise leave it set for the tests after it.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_trained_format_expectation():
    from edge_ad.data import image

    image.put_expected_format(None)
    yield
    image.put_expected_format(None)


@pytest.fixture(scope="session")
def mosquitto_binary() -> str:
    from edge_ad.mqtt.broker import find_mosquitto

    path = find_mosquitto()
    if path is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
    return path


@pytest.fixture
def mosquitto_factory(tmp_path, mosquitto_binary):
    from edge_ad.mqtt.broker import Mosquitto

    brokers: list[Mosquitto] = []

    def make(start: bool = True, **kw) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"broker{len(brokers)}", binary=mosquitto_binary, **kw)
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.close()


@pytest.fixture
def mosquitto(mosquitto_factory):
    return mosquitto_factory()
