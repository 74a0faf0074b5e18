"""A tiny text model in the Hub layout, built offline: a random Mixtral checkpoint (save_pretrained) and a
WordLevel tokenizer trained with the tokenizers library on a few sentences (tokenizer.json +
tokenizer_config.json with a chat template), whose end-of-sequence token is one the model emits greedily
after a few steps (so that stopping at EOS happens in the tests)."""
from pathlib import Path

import torch

from oracles import hf_tiny_model

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a model of experts routes every token to two of them",
    "user : hello there , how are you today ?",
    "assistant : fine thanks and you ?",
    "one two three four five six seven eight nine ten",
    "red green blue yellow black white orange purple",
    "cats and dogs live in small houses near the river",
]
SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
PROMPTS = ["the quick brown fox", "one two three", "cats and dogs live in", "red green", "a model of experts"]


def _vocab() -> dict[str, int]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    return tok.get_vocab()


def _eos_id(model, prompt_ids: list[list[int]], vocab_size: int) -> int:
    """A token the model emits greedily at step 2 or later and not before, on one of the prompts."""
    for ids in prompt_ids:
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        for step in range(2, len(out)):
            if out[step] not in out[:step] and out[step] > 2:
                return out[step]
    raise AssertionError("no prompt continues with a new token after two steps")


def build(directory: Path, seed: int = 0) -> Path:
    """Write the model and its tokenizer into `directory`; returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab()
    model = hf_tiny_model("mixtral", seed=seed, vocab_size=len(vocab), bos_token_id=vocab["<s>"])
    pre = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    pre.pre_tokenizer = pre_tokenizers.Whitespace()
    prompt_ids = [[vocab["<s>"]] + pre.encode(p).ids for p in PROMPTS]
    eos = _eos_id(model, prompt_ids, len(vocab))
    # "</s>" takes the id of that token, the word takes "</s>"'s
    word = next(w for w, i in vocab.items() if i == eos)
    vocab[word], vocab["</s>"] = vocab["</s>"], eos
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = vocab["<s>"]
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return Path(directory)
