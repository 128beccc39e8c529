from __future__ import annotations

import pytest

from p2pml import errors


@pytest.mark.parametrize(
    ("child", "parents"),
    [
        (errors.ConfigError, (errors.P2PMLError, ValueError)),
        (errors.ProtocolError, (errors.P2PMLError,)),
        (errors.WireFormatError, (errors.ProtocolError,)),
        (errors.UnexpectedMessage, (errors.ProtocolError,)),
        (errors.TransportError, (errors.P2PMLError,)),
        (errors.PeerUnreachable, (errors.TransportError,)),
        (errors.PeerTimeout, (errors.TransportError, TimeoutError)),
        (errors.PeerRejected, (errors.TransportError,)),
        (errors.OverlayError, (errors.P2PMLError,)),
        (errors.BarrierTimeout, (errors.P2PMLError, TimeoutError)),
    ],
)
def test_error_tree_matches_the_documented_tree(child, parents):
    for parent in parents:
        assert issubclass(child, parent)
    assert child.__name__ in (errors.__doc__ or "")


def test_config_error_message_names_field_value_and_allowed():
    err = errors.ConfigError("nodes", 0, "an integer >= 1")
    assert str(err) == "nodes: got 0; expected an integer >= 1"
