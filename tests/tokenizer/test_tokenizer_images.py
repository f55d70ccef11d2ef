"""The tokenizer service with images (a tiny LLaVA folder: the SmolLM2 tokenizer plus `<image>`, a CLIP
image processor): image parts decoded and processed by the model's own HF processor, the placeholder
expanded and located, tensors and hashes over gRPC; SGLang's named templates chatml-llava and
llava_llama_3 write image parts; Encode with images (SGLang's image_data); refusals."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
import transformers

from radixserve.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from radixserve.common import grpc_util
from radixserve.common.model_files import resolve_model_path
from radixserve.common.multimodal import prompt_images_from_proto
from radixserve.tokenizer.conversation import Conversation
from radixserve.tokenizer.core import TokenizerCore
from radixserve.tokenizer.server import start_server
from tests.executor.tiny_llava import build_tiny_llava, picture

IMAGE_ROWS = 4  # a 28-pixel CLIP image in 14-pixel patches, CLS dropped


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    build_tiny_llava("llava", folder)
    return folder


@pytest.fixture(scope="module")
def core(folder):
    return TokenizerCore(folder)


def user(*parts) -> Conversation:
    content = [
        {"type": "image"} if isinstance(p, bytes) else {"type": "text", "text": p} for p in parts
    ]
    images = [p for p in parts if isinstance(p, bytes)]
    return Conversation(
        [{"role": "user", "content": content}], add_generation_prompt=True, images=images
    )


def test_images_are_processed_like_the_hf_processor(core, folder):
    (r,) = core.apply_chat_template([user(picture(1), "and", picture(2), "Which?")])
    token = core.images.image_token_id
    assert [(i.offset, i.length) for i in r.images] == [
        (i, IMAGE_ROWS) for i in range(len(r.ids)) if r.ids[i] == token and r.ids[i - 1] != token
    ]
    processor = transformers.AutoProcessor.from_pretrained(str(folder))
    from radixserve.tokenizer.images import decode_image

    expected = processor(
        text=[r.prompt],
        images=[decode_image(picture(1), 0), decode_image(picture(2), 1)],
        return_tensors="pt",
        add_special_tokens=False,
    )
    assert r.ids == expected["input_ids"][0].tolist()
    assert torch.equal(
        torch.cat([i.tensors.pixel_values for i in r.images]), expected["pixel_values"]
    )
    assert r.images[0].hash != r.images[1].hash


def test_the_same_picture_has_the_same_hash(core):
    (a,) = core.apply_chat_template([user(picture(3), "Hi")])
    (b,) = core.apply_chat_template([user(picture(3), "Other text")])
    assert a.images[0].hash == b.images[0].hash


@pytest.mark.parametrize("name", ["chatml-llava", "llava_llama_3"])
def test_named_llava_templates_write_image_parts(folder, name):
    core = TokenizerCore(folder, chat_template=name)
    (r,) = core.apply_chat_template([user(picture(4), "Describe it.")])
    assert "<image>\nDescribe it." in r.prompt
    assert len(r.images) == 1 and r.images[0].length == IMAGE_ROWS


def test_refusals(core):
    with pytest.raises(ValueError, match="could not be decoded"):
        core.apply_chat_template([user(b"not an image", "What?")])
    with pytest.raises(ValueError, match="do not fit the prompt"):
        core.with_images("no placeholder", [picture(5)])
    text_only = TokenizerCore(resolve_model_path(None))
    with pytest.raises(ValueError, match="takes no image inputs"):
        text_only.apply_chat_template([user(picture(6), "What?")])


async def _grpc_scenario(core: TokenizerCore) -> None:
    server, port = await start_server(core, "127.0.0.1:0")
    try:
        async with grpc_util.aio_channel(f"127.0.0.1:{port}") as channel:
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            message = common_pb2.ChatMessage(
                role="user",
                content_parts=[
                    common_pb2.ChatContentPart(image=picture(7)),
                    common_pb2.ChatContentPart(text="What is it?"),
                ],
            )
            chats = await stub.ApplyChatTemplate(
                tokenizer_pb2.TokenizerChatRequest(
                    conversations=[
                        common_pb2.ChatConversation(messages=[message], add_generation_prompt=True)
                    ]
                )
            )
            result = chats.results[0]
            (expected,) = core.apply_chat_template([user(picture(7), "What is it?")])
            assert list(result.ids) == expected.ids
            (image,) = prompt_images_from_proto(result.images)
            assert (image.offset, image.length, image.hash) == (
                expected.images[0].offset,
                IMAGE_ROWS,
                expected.images[0].hash,
            )
            assert torch.equal(image.tensors.pixel_values, expected.images[0].tensors.pixel_values)

            encoded = await stub.Encode(
                tokenizer_pb2.TokenizerEncodeRequest(
                    texts=["USER: <image>\nHi", "plain"],
                    add_special_tokens=False,
                    images=[
                        tokenizer_pb2.TokenizerTextImages(images=[picture(7)]),
                        tokenizer_pb2.TokenizerTextImages(),
                    ],
                )
            )
            with_image, plain = encoded.multimodal
            assert len(with_image.images) == 1 and with_image.images[0].length == IMAGE_ROWS
            assert with_image.images[0].hash == expected.images[0].hash
            assert not plain.images and list(plain.ids) == core.encode(["plain"])[0]
            assert [list(r.ids) for r in encoded.results] == [list(with_image.ids), list(plain.ids)]

            bad = common_pb2.ChatMessage(
                role="user", content_parts=[common_pb2.ChatContentPart(image=b"\x89PNG broken")]
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ApplyChatTemplate(
                    tokenizer_pb2.TokenizerChatRequest(
                        conversations=[common_pb2.ChatConversation(messages=[bad])]
                    )
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "could not be decoded" in err.value.details()
    finally:
        await server.stop(None)


def test_grpc_images_in_process(core):
    asyncio.run(_grpc_scenario(core))
