"""The fake detokenizer of tests/gateway/fakes.py."""

from radixserve.v1 import detokenizer_pb2
from tests.gateway.fakes import decode_item, encode


def test_fake_detokenizer_holds_back_possible_stop_prefixes():
    first = decode_item(
        detokenizer_pb2.DetokenizerDecodeItem(new_token_ids=encode("abc f"), stop=["fox"])
    )
    assert (first.text, first.state.held_text, first.stopped) == ("abc ", "f", False)
    second = decode_item(
        detokenizer_pb2.DetokenizerDecodeItem(
            state=first.state, new_token_ids=encode("ox!"), stop=["fox"]
        )
    )
    assert (second.text, second.stopped, second.matched_stop) == ("", True, "fox")
