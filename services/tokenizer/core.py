"""The tokenizer itself: encoding, chat-template rendering and a description, on top of an HF fast tokenizer.

transformers renders chat templates in a sandboxed Jinja environment; templates are only ever
rendered through `apply_chat_template`, so that stays true here.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from dataclasses import dataclass, field

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from radixserve.common.args import ServerArgs
from radixserve.common.multimodal import PromptImage
from radixserve.common.model_files import resolve_model_path
from radixserve.common.sampling import SamplingDefaults, SamplingError
from radixserve.tokenizer.conversation import Conversation
from radixserve.tokenizer.images import NO_IMAGE_INPUTS, ImageProcessing
from radixserve.tokenizer.named_chat_templates import resolve_chat_template

log = logging.getLogger("radixserve.tokenizer")


@dataclass
class RenderedChat:
    prompt: str
    ids: list[int]
    images: list[PromptImage] = field(default_factory=list)
    mrope_positions: list[int] = field(default_factory=list)  # [3, len(ids)] flattened, or empty
    mrope_position_delta: int = 0


@dataclass
class TokenizerDescription:
    vocab_size: int
    eos_token_ids: list[int]
    bos_token_id: int  # -1 when there is none
    chat_template: str  # "" when there is none
    tokenizer_path: str
    generation_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)


def tokenizer_folder(args: ServerArgs) -> pathlib.Path:
    # --revision is the model's: it applies to --tokenizer-path only when that names the model itself.
    own_tokenizer = args.tokenizer_path is not None and args.tokenizer_path != args.model_path
    return resolve_model_path(
        args.tokenizer_path or args.model_path,
        revision=None if own_tokenizer else args.revision,
        download_dir=args.download_dir,
        weights=False,
    )


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{folder} has no fast tokenizer (tokenizer.json)")
    return tokenizer


def generation_config_eos_ids(folder: pathlib.Path) -> list[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def generation_defaults(folder: pathlib.Path, setting: str = "auto") -> SamplingDefaults:
    """The sampling defaults --generation-config names: auto, those of folder's generation_config.json;
    vllm, none; otherwise the generation_config.json of the folder it names (which must exist)."""
    if setting == "vllm":
        return SamplingDefaults()
    if setting != "auto":
        folder = pathlib.Path(setting).expanduser()
        if not (folder / "generation_config.json").is_file():
            raise FileNotFoundError(
                f"--generation-config {setting}: no generation_config.json there"
            )
    path = folder / "generation_config.json"
    if not path.is_file():
        return SamplingDefaults()
    try:
        return SamplingDefaults.from_generation_config(json.loads(path.read_text()), str(path))
    except (json.JSONDecodeError, SamplingError) as e:
        log.warning("ignoring the sampling defaults of %s: %s", path, e)
        return SamplingDefaults()


def _default_template(template: str | dict | None) -> str:
    if isinstance(template, dict):  # named templates: the "default" one is what plain chats use
        return template.get("default", "")
    return template or ""


class TokenizerCore:
    def __init__(
        self,
        folder: str | os.PathLike,
        chat_template: str | None = None,
        generation_config: str = "auto",
    ):
        self.folder = pathlib.Path(folder)
        self.generation_defaults = generation_defaults(self.folder, generation_config)
        self.tokenizer = load_tokenizer(self.folder)
        if chat_template is not None:
            self.tokenizer.chat_template = resolve_chat_template(chat_template)
        self._eos_ids = self._collect_eos_ids()
        self.images = ImageProcessing(self.folder, self.tokenizer)

    def _collect_eos_ids(self) -> list[int]:
        ids = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        for eos in generation_config_eos_ids(self.folder):
            if eos not in ids:
                ids.append(eos)
        return ids

    def encode(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]

    def render_chat(self, conversation: Conversation) -> str:
        if not self.tokenizer.chat_template:
            raise ValueError(
                f"the tokenizer in {self.folder} has no chat template; pass --chat-template"
            )
        try:
            return self.tokenizer.apply_chat_template(
                conversation.messages,
                tools=conversation.tools,
                add_generation_prompt=conversation.add_generation_prompt,
                continue_final_message=conversation.continue_final_message,
                tokenize=False,
                **conversation.template_kwargs,
            )
        except ValueError:
            raise
        except (
            Exception
        ) as e:  # anything a template raises (raise_exception, undefined, type errors)
            raise ValueError(f"chat template error: {type(e).__name__}: {e}") from e

    def apply_chat_template(self, conversations: list[Conversation]) -> list[RenderedChat]:
        if any(c.images for c in conversations) and not self.images.enabled:
            raise ValueError(NO_IMAGE_INPUTS)
        prompts = [self.render_chat(c) for c in conversations]
        # The template writes its own special tokens; adding more would double the BOS.
        ids = self.encode(prompts, add_special_tokens=False)
        return [
            self.with_images(p, c.images) if c.images else RenderedChat(p, i)
            for p, i, c in zip(prompts, ids, conversations)
        ]

    def with_images(
        self, prompt: str, images: list[bytes], add_special_tokens: bool = False
    ) -> RenderedChat:
        """A prompt whose image placeholders the images fill: its ids with the placeholders
        expanded, and the processed images (ValueError: no image inputs, or bad images)."""
        ids, prompt_images, mrope, delta = self.images.process(prompt, images, add_special_tokens)
        return RenderedChat(prompt, ids, prompt_images, mrope, delta)

    def info(self) -> TokenizerDescription:
        bos = self.tokenizer.bos_token_id
        return TokenizerDescription(
            vocab_size=len(self.tokenizer),
            eos_token_ids=list(self._eos_ids),
            bos_token_id=-1 if bos is None else bos,
            chat_template=_default_template(self.tokenizer.chat_template),
            tokenizer_path=str(self.folder),
            generation_defaults=self.generation_defaults,
        )
